"""The unit that flows through the pipeline, and the counters every step keeps."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field

MAX_EXAMPLES_PER_REASON = 20


@dataclass
class Document:
    """One document. `key` orders documents globally (input file index, record index) so that
    "keep the lowest" and shard order never depend on task scheduling."""

    id: str
    text: str
    source: str
    key: int
    url: str | None = None
    title: str | None = None
    html: str | None = None  # raw HTML until the extract step turns it into `text`
    tokens: object = None  # np.ndarray after tokenization


PIECE_BITS = 8  # room for the pieces decontamination may split a document into (key + piece index)


def make_key(file_index: int, record_index: int) -> int:
    return (file_index << (32 + PIECE_BITS)) | (record_index << PIECE_BITS)


def file_index_of(key: int) -> int:
    return key >> (32 + PIECE_BITS)


@dataclass
class StepStats:
    """Per-step counters: in + notes["split_pieces"] = out + sum(removed) (a step that splits a document
    notes the extra pieces). `notes` count events that keep the document (e.g. text repaired from invalid
    UTF-8); `examples` keep a few removed ids per reason."""

    docs_in: int = 0
    docs_out: int = 0
    removed: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def remove(self, doc: Document, reason: str) -> None:
        self.removed[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < MAX_EXAMPLES_PER_REASON:
            ids.append(doc.id)

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.removed.update(other.removed)
        self.notes.update(other.notes)
        for reason, ids in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ids[: MAX_EXAMPLES_PER_REASON - len(mine)])
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.tokens += other.tokens
        self.seconds += other.seconds

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["removed"] = dict(sorted(self.removed.items()))
        data["notes"] = dict(sorted(self.notes.items()))
        data["seconds"] = round(self.seconds, 4)
        return data

    @classmethod
    def from_json(cls, data: dict) -> StepStats:
        return cls(**{**data, "removed": Counter(data["removed"]), "notes": Counter(data["notes"])})


class Timer:
    """Adds the wall time of a `with` block to a StepStats."""

    def __init__(self, stats: StepStats):
        self.stats = stats

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.stats.seconds += time.perf_counter() - self.start
