"""Language ID with fastText lid.176: keep target languages scored at or above `min_score`."""
from __future__ import annotations

from pydantic import Field

from data_pipeline.document import Document
from data_pipeline.schema import Section
from data_pipeline.step import Filter


class LanguageFilterConfig(Section):
    model_path: str = "../shared/data/langid/lid.176.ftz"
    languages: list[str] = ["en"]
    min_score: float = Field(0.65, ge=0, le=1)


class LanguageFilter(Filter):
    name = "language"

    def __init__(self, config: LanguageFilterConfig):
        import fasttext  # here, so that loading a config never loads fastText

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
