"""GPT-3's schedules, both measured in tokens so they do not depend on the batch size:
learning rate (linear warmup, then cosine decay to `min_lr_ratio` of the peak, then flat) and the
batch-size ramp (Brown et al. 2020, Appendix B), realised as gradient accumulation steps so the
DeepSpeed engine never has to be rebuilt."""
from __future__ import annotations

import math

from trainer.config import TrainConfig


def lr_at(tokens: int, t: TrainConfig) -> float:
    if t.warmup_tokens and tokens < t.warmup_tokens:
        return t.lr * (tokens + 1) / t.warmup_tokens
    span = max(t.decay_tokens - t.warmup_tokens, 1)
    progress = min(max(tokens - t.warmup_tokens, 0) / span, 1.0)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def accumulation_at(tokens: int, t: TrainConfig, full_accum: int, dp_size: int) -> int:
    """Micro-batches per rank for the next step: the batch grows linearly from
    `batch_rampup_start_tokens` to the full batch over `batch_rampup_tokens`, in whole micro-batches."""
    if not t.batch_rampup_tokens or tokens >= t.batch_rampup_tokens:
        return full_accum
    full_batch_tokens = t.global_batch_size * t.tokens_per_sequence
    start = min(t.batch_rampup_start_tokens, full_batch_tokens)
    batch_tokens = start + (full_batch_tokens - start) * tokens / t.batch_rampup_tokens
    per_micro = t.micro_batch_size * t.tokens_per_sequence * dp_size
    return max(1, min(full_accum, int(batch_tokens // per_micro)))
