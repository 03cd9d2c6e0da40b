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
# grads plus fp32 master weights, momentum and variance (12); fp32 keeps 4 + 4 and Adam's 8, plus, at
# ZeRO stages 1-3, the fp32 partition DeepSpeed's optimizer works on, a copy even of fp32 weights (4).
_BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
_ZERO_FP32_MASTER = 4


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
    if precision == "fp32" and zero_stage >= 1:
        o_bytes += _ZERO_FP32_MASTER
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


def zero3_layer_elements(cfg: ModelConfig) -> int:
    """ZeRO-3 gathers one module at a time: a block (dense; experts are not ZeRO-3 partitioned) or the
    token embedding, whichever is larger."""
    d = cfg.d_model
    return max(4 * d * d + 2 * d * cfg.ff_width, cfg.vocab_size * d)


def zero_settings(cfg: ModelConfig, stage: int) -> dict:
    """The `zero_optimization` section the engine runs with (the planner counts the same buffers).

    ZeRO-3's defaults keep up to 1e9 gathered parameters alive and reuse them within 1e9, which for any
    model under a billion parameters means the whole model gathered on every rank: here at most two
    modules are live (the one running and the one prefetched), and the gradient bucket holds one module.
    """
    if stage < 3:
        bucket = comm_bucket_elements(cfg)
        return {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    layer = zero3_layer_elements(cfg)
    return {"stage": 3, "reduce_bucket_size": layer, "stage3_prefetch_bucket_size": layer,
            "stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": layer,
            "stage3_param_persistence_threshold": 10 * cfg.d_model}
