"""Deduplication: exact (normalized-text hash) and MinHash LSH, as a global stage over the
signatures every task saved, partitioned across tasks (see `data_pipeline.stages.deduplicate`)."""
from __future__ import annotations

from pydantic import Field

from data_pipeline.schema import Section


class MinHashConfig(Section):
    """LSH over `bands` x `rows` MinHash values: two documents with Jaccard similarity s share a
    bucket with probability 1 - (1 - s^rows)^bands."""
    enabled: bool = True
    ngram: int = Field(5, gt=0)
    bands: int = Field(14, gt=0)
    rows: int = Field(8, gt=0)
    seed: int = 1


class DedupConfig(Section):
    exact: bool = True
    minhash: MinHashConfig = MinHashConfig()
    partition_entries: int = Field(8_000_000, gt=0, description="dedup entries (documents x (bands + 1)) per "
                                   "partition task: bounds each task's memory (~100 bytes per entry at peak)")
