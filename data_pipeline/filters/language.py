"""Language ID with fastText lid.176: keep target languages scored at or above `min_score`."""
from __future__ import annotations

import fasttext

from data_pipeline.config import LanguageFilterConfig
from data_pipeline.document import Document
from data_pipeline.step import Filter


class LanguageFilter(Filter):
    name = "language"

    def __init__(self, config: LanguageFilterConfig):
        self.model = fasttext.load_model(config.model_path)
        self.languages = set(config.languages)
        self.min_score = config.min_score

    def predict(self, text: str) -> tuple[str, float]:
        labels, scores = self.model.predict(text.replace("\n", " "), k=1)
        return labels[0].removeprefix("__label__"), float(scores[0])

    def reason(self, doc: Document) -> str | None:
        language, score = self.predict(doc.text)
        if language not in self.languages:
            return "other_language"
        return "low_score" if score < self.min_score else None
