"""Deduplication: exact (normalized-text hash) and MinHash LSH, as a global stage over the
signatures every task saved (see `data_pipeline.stages.dedup_stage`)."""
