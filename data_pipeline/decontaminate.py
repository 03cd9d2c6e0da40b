"""Decontamination as in GPT-3 (Brown et al. 2020, App. C): drop a training document that
shares any word 13-gram with an evaluation text. The removal reason names the eval set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from data_pipeline.dedup.minhash import shingle_hashes, word_hashes
from data_pipeline.document import Document
from data_pipeline.errors import PipelineError
from data_pipeline.schema import Section
from data_pipeline.step import Filter
from data_pipeline.text import normalize_for_dedup


class DecontaminationConfig(Section):
    eval_sets: list[str] = []  # JSONL files; the step runs when there is at least one
    text_field: str = "text"
    ngram: int = Field(13, gt=0)


def ngram_hashes(text: str, n: int) -> np.ndarray:
    words = word_hashes(normalize_for_dedup(text))
    return shingle_hashes(words, n) if words.size >= n else np.zeros(0, np.uint64)


def load_eval_ngrams(path: Path, text_field: str, n: int) -> np.ndarray:
    """Sorted unique n-gram hashes of every text in a JSONL eval set."""
    hashes = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError):
                raise PipelineError(f"{path}:{line_no}: expected a JSON object with a string {text_field!r}") from None
            hashes.append(ngram_hashes(str(text), n))
    return np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)


class Decontaminate(Filter):
    name = "decontaminate"

    def __init__(self, eval_sets: list[str], text_field: str, n: int):
        self.n = n
        self.eval_sets = {Path(p).stem: load_eval_ngrams(Path(p), text_field, n) for p in eval_sets}

    def reason(self, doc: Document) -> str | None:
        grams = ngram_hashes(doc.text, self.n)
        for name, eval_grams in self.eval_sets.items():
            if grams.size and eval_grams.size and np.isin(grams, eval_grams, assume_unique=False).any():
                return f"overlaps_{name}"
        return None
