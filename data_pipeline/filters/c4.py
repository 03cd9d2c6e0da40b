"""C4 rules (Raffel et al. 2020, Section 2.2; line rules follow the released c4_utils code):
lines without terminal punctuation, with too few words, with an overlong word, mentioning
javascript or a cookie/terms policy are dropped from the text; a page with "lorem ipsum" or a
curly bracket, or with too few sentences left, is removed."""
from __future__ import annotations

import re

from data_pipeline.document import Document, StepStats
from data_pipeline.schema import Section
from data_pipeline.step import Step
from data_pipeline.text import count_sentences

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
TERMINAL_PUNCT = (".", "?", "!", '"', "'")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4FilterConfig(Section):
    """Raffel et al. 2020, Section 2.2 (line filters rewrite the text, page filters remove it)."""
    min_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    require_terminal_punct: bool = True
    remove_citations: bool = True
    drop_lorem_ipsum: bool = True
    drop_javascript_lines: bool = True
    drop_curly_bracket: bool = True
    drop_policy_lines: bool = True


class C4Filter(Step):
    name = "c4"

    def __init__(self, config: C4FilterConfig):
        self.c = config

    def process(self, doc: Document, stats: StepStats) -> Document | None:
        kept, sentences = [], 0
        for raw_line in doc.text.splitlines():
            line = self._keep_line(raw_line.strip())
            if line is None:
                continue
            lowered = line.lower()
            if self.c.drop_lorem_ipsum and "lorem ipsum" in lowered:
                return self._remove(doc, stats, "lorem_ipsum")
            if self.c.drop_curly_bracket and "{" in line:
                return self._remove(doc, stats, "curly_bracket")
            if self._drop_by_content(lowered):
                continue
            sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.c.min_sentences:
            return self._remove(doc, stats, "too_few_sentences")
        stats.notes["lines_dropped"] += doc.text.count("\n") + 1 - len(kept)
        doc.text = "\n".join(kept).strip()
        return doc

    def _keep_line(self, line: str) -> str | None:
        words = line.split()
        if any(len(w) > self.c.max_word_length for w in words):
            return None
        if self.c.remove_citations:
            line = CITATION_RE.sub("", line)
        if self.c.require_terminal_punct and (not line.endswith(TERMINAL_PUNCT) or line.endswith("...")):
            return None
        return line if len(words) >= self.c.min_words_per_line else None

    def _drop_by_content(self, lowered: str) -> bool:
        if self.c.drop_javascript_lines and "javascript" in lowered:
            return True
        return self.c.drop_policy_lines and any(p in lowered for p in POLICY_PHRASES)

    def _remove(self, doc: Document, stats: StepStats, reason: str) -> None:
        stats.remove(doc, f"{self.name}:{reason}")
        return None
