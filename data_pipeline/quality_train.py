"""Train the GPT-3-style quality classifier: documents of reference sources (books, Wikipedia)
are positives, raw crawl pages (extracted, unfiltered) negatives; hashed word 1-2-gram
features and logistic regression. Saved as a small .npz (no pickle) that
`filters.quality_classifier.model_path` loads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from data_pipeline.config import PipelineConfig, path_bases, resolve_glob
from data_pipeline.document import StepStats
from data_pipeline.errors import PipelineError
from data_pipeline.extract import ExtractHtml
from data_pipeline.filters.quality import save_model, vectorizer
from data_pipeline.readers import READERS
from data_pipeline.step import run_steps


def source_texts(config: PipelineConfig, config_dir: Path, name: str, limit: int) -> list[str]:
    source = next((s for s in config.sources if s.name == name), None)
    if source is None:
        raise PipelineError(f"no source named {name!r} in the config")
    texts: list[str] = []
    extract = [ExtractHtml(source.extract)] if source.format == "warc" else []
    for index, path in enumerate(p for pattern in source.inputs for p in resolve_glob(pattern, path_bases(config_dir))):
        docs = READERS[source.format](path, name, index, StepStats(), max_doc_chars=source.max_doc_chars,
                                      text_field=source.text_field, id_field=source.id_field)
        texts += [d.text for d in run_steps(docs, extract, {})][: limit - len(texts)]
    for step in extract:
        step.close()
    return texts


def train_from_config(config: PipelineConfig, config_dir: Path, positive: list[str], negative: list[str],
                      out: Path, max_docs: int) -> dict:
    pos = [t for name in positive for t in source_texts(config, config_dir, name, max_docs)]
    neg = [t for name in negative for t in source_texts(config, config_dir, name, max_docs)]
    if not pos or not neg:
        raise PipelineError(f"need documents on both sides, got {len(pos)} positive and {len(neg)} negative")
    features = vectorizer().transform(pos + neg)
    labels = np.array([1] * len(pos) + [0] * len(neg))
    model = LogisticRegression(max_iter=1000, class_weight="balanced").fit(features, labels)
    save_model(out, model.coef_[0], float(model.intercept_[0]))
    return {"out": str(out), "positive": len(pos), "negative": len(neg),
            "train_accuracy": round(float(model.score(features, labels)), 4)}
