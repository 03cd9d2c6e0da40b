"""DeepSpeed ZeRO arithmetic from the config alone: model-state bytes per GPU at each stage, and the
communication bucket the engine allocates. The engine sizes its buckets here; the planner and
`pretrain model info` estimate memory with the same numbers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config import ModelConfig
from trainer.model.counting import param_counts


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU for model states; activations and temporary buffers are not included."""

    weights: float
    grads: float
    optimizer: float
    total: float


# Bytes per parameter (ZeRO paper, Rajbhandari et al. 2020): mixed precision keeps 16-bit weights and
# grads plus fp32 master weights, momentum and variance (12); fp32 keeps 4 + 4 and Adam's 8.
_BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}


def memory_per_gpu(cfg: ModelConfig, zero_stage: int, dp_size: int, ep_size: int = 1,
                   precision: Literal["bf16", "fp16", "fp32"] = "bf16") -> MemoryEstimate:
    """Weights, grads and Adam states per GPU under ZeRO stage 0-3 with `dp_size` data-parallel ranks.

    Stage 1 partitions optimizer states over the data-parallel ranks, stage 2 also gradients,
    stage 3 also weights. Expert parameters are first split over the `ep_size` expert-parallel
    ranks, and their ZeRO partitioning is over the dp_size / ep_size ranks that hold the same experts
    (ep_size divides dp_size: callers check with `ModelConfig.expert_parallel_error`).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    counts = param_counts(cfg)
    groups = ((counts.total - counts.expert, dp_size), (counts.expert / ep_size, dp_size // ep_size))
    w_bytes, g_bytes, o_bytes = _BYTES[precision]
    weights = grads = optimizer = 0.0
    for params, shards in groups:
        weights += params * w_bytes / (shards if zero_stage >= 3 else 1)
        grads += params * g_bytes / (shards if zero_stage >= 2 else 1)
        optimizer += params * o_bytes / (shards if zero_stage >= 1 else 1)
    return MemoryEstimate(weights=weights, grads=grads, optimizer=optimizer, total=weights + grads + optimizer)


# DeepSpeed's default reduce / all-gather bucket, in elements.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000


def comm_bucket_elements(cfg: ModelConfig) -> int:
    """Gradient bucket size the trainer gives DeepSpeed: its default, capped at the model's size.

    ZeRO-1/2 allocate a flat [bucket] gradient buffer up front (contiguous_gradients), even on one
    rank, so DeepSpeed's 5e8-element default costs 2 GB of fp32 for any model; a bucket larger
    than all the gradients buys nothing. Rounded up to a multiple of 1M elements.
    """
    total = param_counts(cfg).total
    return int(min(DEEPSPEED_BUCKET_ELEMENTS, -(-total // 1_000_000) * 1_000_000))
