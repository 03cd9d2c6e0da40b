"""GPT-3-style quality classifier (Brown et al. 2020, Appendix A): hashed word n-gram features
and logistic regression, trained to tell a reference corpus (books, Wikipedia) from raw crawl.
A document is kept when `pareto(alpha) > 1 - score`, with an RNG seeded by the run seed and
the document id, so the decision never depends on which worker saw the document."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydantic import Field

from data_pipeline.document import Document
from data_pipeline.errors import PipelineError
from data_pipeline.schema import Section
from data_pipeline.step import Filter

N_FEATURES = 1 << 18
NGRAM_RANGE = (1, 2)


class QualityClassifierConfig(Section):
    """GPT-3 (Brown et al. 2020, App. A): keep when pareto(alpha) > 1 - score."""
    model_path: str
    pareto_alpha: float = Field(9.0, gt=0)


def vectorizer():
    """sklearn's HashingVectorizer; imported here, so that loading a config never loads sklearn."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=N_FEATURES, ngram_range=NGRAM_RANGE, alternate_sign=False, norm="l2")


def save_model(path: Path, coef: np.ndarray, intercept: float) -> None:
    np.savez_compressed(path, coef=coef.astype(np.float32), intercept=np.float32(intercept),
                        n_features=N_FEATURES, ngram_range=np.array(NGRAM_RANGE))


class QualityModel:
    def __init__(self, path: str | Path):
        try:
            with np.load(path, allow_pickle=False) as data:
                self.coef, self.intercept = data["coef"], float(data["intercept"])
                shape_ok = int(data["n_features"]) == N_FEATURES and tuple(data["ngram_range"]) == NGRAM_RANGE
        except (OSError, KeyError, ValueError) as e:
            raise PipelineError(f"{path}: not a quality classifier file ({e})") from None
        if not shape_ok:
            raise PipelineError(f"{path}: trained with other feature settings; retrain it")
        self.vectorizer = vectorizer()

    def scores(self, texts: list[str]) -> np.ndarray:
        logits = self.vectorizer.transform(texts) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))


def document_rng(seed: int, doc_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


class QualityClassifierFilter(Filter):
    name = "quality_classifier"

    def __init__(self, config: QualityClassifierConfig, seed: int):
        self.model = QualityModel(config.model_path)
        self.alpha, self.seed = config.pareto_alpha, seed

    def reason(self, doc: Document) -> str | None:
        score = float(self.model.scores([doc.text])[0])
        keep = document_rng(self.seed, doc.id).pareto(self.alpha) > 1 - score
        return None if keep else "low_quality_sample"
