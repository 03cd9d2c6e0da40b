"""Decontamination as GPT-3 did it (Brown et al. 2020, Appendix C).

A training document that shares a word 13-gram with an evaluation text loses that 13-gram and
`window` characters on each side; the document is split where text was removed, pieces shorter
than `min_piece` characters are dropped, and a document split into more than `max_pieces` pieces
is dropped whole. `mode: drop` drops every colliding document instead. Per eval set the step
counts documents cut (note `cut_<set>`), documents dropped (removal reason `<set>` or
`<set>_short`) and colliding 13-grams (note `ngrams_<set>`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from data_pipeline.dedup.minhash import shingle_hashes, word_hashes
from data_pipeline.document import Document, StepStats, Timer
from data_pipeline.errors import PipelineError
from data_pipeline.schema import Section
from data_pipeline.step import Step
from data_pipeline.text import normalize_for_dedup

WORD_RE = re.compile(r"\w+")  # the words normalize_for_dedup keeps: runs of word characters


class DecontaminationConfig(Section):
    eval_sets: list[str] = []  # JSONL files; the step runs when there is at least one
    text_field: str = "text"
    ngram: int = Field(13, gt=0)
    mode: Literal["split", "drop"] = "split"  # GPT-3's cut-and-split, or drop the whole document
    window: int = Field(200, ge=0, description="characters removed on each side of a colliding n-gram")
    min_piece: int = Field(200, ge=0, description="pieces shorter than this many characters are dropped")
    max_pieces: int = Field(10, gt=0, description="a document split into more pieces is dropped whole")


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


def ngram_spans(text: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, start char, end char) of every word n-gram of `text`, hashed as the eval sets are."""
    words = list(WORD_RE.finditer(text))
    normalized = [normalize_for_dedup(w.group()) for w in words]
    hashes = word_hashes(" ".join(normalized))
    if len(words) < n or hashes.size != len(words) or not all(normalized):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)  # too short to hold an n-gram
    starts = np.array([w.start() for w in words])
    ends = np.array([w.end() for w in words])
    return shingle_hashes(hashes, n), starts[:len(words) - n + 1], ends[n - 1:]


def kept_pieces(text: str, spans: list[tuple[int, int]], window: int) -> list[str]:
    """The text between the removed ranges (each span widened by `window`), in order, non-empty."""
    cuts = sorted((max(0, s - window), min(len(text), e + window)) for s, e in spans)
    pieces, position = [], 0
    for start, end in cuts:
        if start > position:
            pieces.append(text[position:start])
        position = max(position, end)
    if position < len(text):
        pieces.append(text[position:])
    return [p for p in pieces if p.strip()]


class Decontaminate(Step):
    name = "decontaminate"

    def __init__(self, config: DecontaminationConfig):
        self.config = config
        self.eval_sets = {Path(p).stem: load_eval_ngrams(Path(p), config.text_field, config.ngram)
                          for p in config.eval_sets}

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        """Like Step.run, but a cut document may leave as several: in + notes[split_pieces] = out + removed."""
        for doc in docs:
            stats.docs_in += 1
            stats.bytes_in += len(doc.text)
            with Timer(stats):
                pieces = self.pieces(doc, stats)
            if len(pieces) > 1:
                stats.notes["split_pieces"] += len(pieces) - 1
            for piece in pieces:
                stats.docs_out += 1
                stats.bytes_out += len(piece.text)
                yield piece

    def pieces(self, doc: Document, stats: StepStats) -> list[Document]:
        c = self.config
        grams, starts, ends = ngram_spans(doc.text, c.ngram)
        spans, first = [], None
        for name, eval_grams in self.eval_sets.items():
            hits = np.flatnonzero(np.isin(grams, eval_grams)) if grams.size and eval_grams.size else []
            if len(hits):
                stats.notes[f"ngrams_{name}"] += len(hits)
                spans += [(int(starts[i]), int(ends[i])) for i in hits]
                first = first or name
        if first is None:
            return [doc]
        pieces = kept_pieces(doc.text, spans, c.window)
        if c.mode == "drop" or len(pieces) > c.max_pieces:
            stats.remove(doc, f"{self.name}:{first}")
            return []
        kept = [p for p in pieces if len(p) >= c.min_piece]
        if not kept:
            stats.remove(doc, f"{self.name}:{first}_short")
            return []
        stats.notes[f"cut_{first}"] += 1
        return [Document(id=f"{doc.id}#{i}" if len(kept) > 1 else doc.id, text=text, source=doc.source,
                         key=doc.key + i, url=doc.url, title=doc.title) for i, text in enumerate(kept)]
