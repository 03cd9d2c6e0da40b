"""Gopher rules (Rae et al. 2021, Appendix A): repetition (Table A1) and quality (A.1.1)."""
from __future__ import annotations

import re

import numpy as np

from data_pipeline.document import Document
from data_pipeline.schema import Section
from data_pipeline.step import Filter
from data_pipeline.text import split_words

PARAGRAPH_RE = re.compile(r"\n{2,}")
LINES_RE = re.compile(r"\n+")
BULLETS = ("•", "-")
ELLIPSES = ("...", "…")
NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)


class GopherRepetitionConfig(Section):
    """Rae et al. 2021, Table A1."""
    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20
    top_ngram_char_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_ngram_char_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class GopherQualityConfig(Section):
    """Rae et al. 2021, Appendix A.1.1."""
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = ["the", "be", "to", "of", "and", "that", "have", "with"]


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them) counting every occurrence after the first."""
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class NgramIndex:
    """Word n-grams as 64-bit ids (a polynomial over per-document word ids) with their
    character lengths, so the repetition rules count integers instead of joining strings."""

    def __init__(self, words: list[str]):
        vocab: dict[str, int] = {}
        self.ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], np.uint64)
        self.lengths = np.concatenate([[0], np.cumsum([len(w) for w in words], dtype=np.int64)])

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, characters without separators) of every n-gram."""
        count = self.ids.size - n + 1
        if count <= 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        combined = np.zeros(count, np.uint64)
        for k in range(n):
            combined = combined * NGRAM_BASE + self.ids[k:k + count] + np.uint64(1)
        return combined, self.lengths[n:n + count] - self.lengths[:count]


def top_ngram_chars(index: NgramIndex, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length with spaces, times its
    count); ties go to the n-gram seen first, as with Counter.most_common."""
    ids, chars = index.grams(n)
    if ids.size == 0:
        return 0
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    best = first[counts == counts.max()].min()
    return int((chars[best] + n - 1) * counts.max())


def duplicate_ngram_chars(index: NgramIndex, n: int) -> int:
    """Characters in n-grams seen before, skipping past each repeat so overlaps count once."""
    ids, chars = index.grams(n)
    ids, chars = ids.tolist(), chars.tolist()
    seen, total, i = set(), 0, 0
    while i < len(ids):
        if ids[i] in seen:
            total += chars[i]
            i += n
        else:
            seen.add(ids[i])
            i += 1
    return total


class GopherRepetition(Filter):
    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig):
        self.c = config

    def reason(self, doc: Document) -> str | None:
        text = doc.text
        if not text.strip():
            return "empty"
        paragraphs = PARAGRAPH_RE.split(text.strip())
        count, chars = duplicates(paragraphs)
        if count / len(paragraphs) > self.c.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > self.c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = LINES_RE.split(text)
        count, chars = duplicates(lines)
        if count / len(lines) > self.c.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > self.c.dup_line_char_frac:
            return "dup_line_char_frac"
        return self._ngram_reason(split_words(text), len(text))

    def _ngram_reason(self, words: list[str], n_chars: int) -> str | None:
        index = NgramIndex(words)
        for n, frac in sorted(self.c.top_ngram_char_frac.items()):
            if top_ngram_chars(index, n) / n_chars > frac:
                return f"top_{n}_gram"
        for n, frac in sorted(self.c.dup_ngram_char_frac.items()):
            if duplicate_ngram_chars(index, n) / n_chars > frac:
                return f"dup_{n}_gram"
        return None


class GopherQuality(Filter):
    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig):
        self.c = config
        self.stop_words = set(config.stop_words)

    def reason(self, doc: Document) -> str | None:
        text, c = doc.text, self.c
        words = split_words(text)
        content_words = [w for w in words if any(ch.isalnum() for ch in w)]
        if len(content_words) < c.min_words:
            return "too_few_words"
        if len(content_words) > c.max_words:
            return "too_many_words"
        mean_length = sum(map(len, content_words)) / len(content_words)
        if mean_length < c.min_avg_word_length:
            return "short_mean_word_length"
        if mean_length > c.max_avg_word_length:
            return "long_mean_word_length"
        if text.count("#") / len(words) > c.max_symbol_word_ratio:
            return "hash_symbol_ratio"
        if (text.count("...") + text.count("…")) / len(words) > c.max_symbol_word_ratio:
            return "ellipsis_ratio"
        return self._line_and_word_reason(text, words)

    def _line_and_word_reason(self, text: str, words: list[str]) -> str | None:
        lines = text.splitlines() or [""]
        if sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > self.c.max_bullet_lines_ratio:
            return "bullet_lines_ratio"
        if sum(line.rstrip().endswith(ELLIPSES) for line in lines) / len(lines) > self.c.max_ellipsis_lines_ratio:
            return "ellipsis_lines_ratio"
        if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < self.c.min_alpha_words_ratio:
            return "alpha_words_ratio"
        if len(self.stop_words.intersection(words)) < self.c.min_stop_words:
            return "too_few_stop_words"
        return None
