"""FineWeb's three custom rules (Penedo et al. 2024, Section 3.3.4)."""
from __future__ import annotations

from data_pipeline.document import Document
from data_pipeline.filters.gopher import duplicates
from data_pipeline.schema import Section
from data_pipeline.step import Filter
from data_pipeline.text import split_words

# Sentence-final marks across scripts (the common subset of FineWeb's list; closing quotes
# and brackets do not count, as in FineWeb's reference code).
TERMINAL_PUNCT = tuple(".!?。！？．؟।॥።፧၊။")


class FineWebFilterConfig(Section):
    """Penedo et al. 2024, FineWeb's three custom rules."""
    line_punct_ratio: float = 0.12
    short_line_ratio: float = 0.67
    short_line_length: int = 30
    char_dup_ratio: float = 0.01
    newline_word_ratio: float = 0.3


class FineWebFilter(Filter):
    name = "fineweb"

    def __init__(self, config: FineWebFilterConfig):
        self.c = config

    def reason(self, doc: Document) -> str | None:
        lines = [line for line in doc.text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if sum(line.endswith(TERMINAL_PUNCT) for line in lines) / len(lines) < self.c.line_punct_ratio:
            return "line_punct_ratio"
        if sum(len(line) <= self.c.short_line_length for line in lines) / len(lines) > self.c.short_line_ratio:
            return "short_line_ratio"
        if duplicates(lines)[1] / max(1, len(doc.text.replace("\n", ""))) > self.c.char_dup_ratio:
            return "char_dup_ratio"
        if doc.text.count("\n") / max(1, len(split_words(doc.text))) > self.c.newline_word_ratio:
            return "list_ratio"
        return None
