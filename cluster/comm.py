"""Communication in a training step: what DeepSpeed and our expert-parallel layers move per GPU, and
how long it takes on a cluster of nodes (NVLink inside a node, InfiniBand between nodes).

What DeepSpeed 0.19 issues (runtime/engine.py allreduce_gradients, zero/stage_1_and_2.py, zero/stage3.py):
- ZeRO-0 and ZeRO-1 reduce gradients once per step, at the accumulation boundary; ZeRO-2 reduces them
  in backward hooks at every micro-batch. Both stages 1 and 2 all-reduce each gradient bucket (the default
  `use_multi_rank_bucket_allreduce`) and keep their partition: all-reduce volume, not reduce-scatter's.
- ZeRO-1/2 all-gather the updated 16-bit weights once per step, after the optimizer.
- ZeRO-3 all-gathers each module's weights in forward and again in backward, and reduce-scatters the
  gradients, at every micro-batch; gradient accumulation multiplies all three. (A model within the
  engine's stage3_max_live_parameters, two modules, stays gathered and skips the backward gather.) With ZeRO++'s
  `zero_hpz_partition_size` the backward gather reads a secondary copy split inside the node.
- Gradients travel in the training precision (DeepSpeed's communication_data_type: bf16 under bf16).
- Expert parallelism: 4 all-to-alls per MoE layer per micro-batch (dispatch and combine, forward and
  backward), each of the [experts x capacity, d] slot buffer; expert gradients are reduced over the
  dp/ep ranks that hold the same experts.

Ring collectives move (n-1)/n of the buffer through each GPU's link (all-gather, reduce-scatter,
all-to-all) or twice that (all-reduce). A group inside one node runs at NVLink bandwidth, one spanning
nodes at the per-GPU InfiniBand bandwidth. Ranks are placed as DeepSpeed groups them: data-parallel,
expert-parallel and hpz groups are consecutive ranks, expert-data-parallel groups stride by ep_size.

Overlap: DeepSpeed prefetches ZeRO-3's gathers and overlaps its reduce-scatters with compute
(overlap_comm defaults on at stage 3), so those hide behind `overlap` x compute time. ZeRO-0/1/2
reductions (overlap_comm off in our engine), the post-step weight gather and the all-to-alls (the
experts wait for their tokens) are exposed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trainer.config import ModelConfig
from trainer.model.counting import Example, param_counts
from trainer.zero_memory import zero3_layer_elements


@dataclass(frozen=True)
class Hardware:
    """One GPU type in nodes of `gpus_per_node`; bandwidths are GB/s per GPU, one direction."""

    name: str
    gpu_tflops: float  # peak dense bf16
    gpu_memory_gb: float
    gpus_per_node: int
    nvlink_gbps: float
    ib_gbps: float


# Datasheets: A100 SXM 312 TFLOP/s, NVLink 3 600 GB/s both ways, one HDR 200 Gb/s HCA per GPU (DGX A100);
# H100/H200 SXM 989 TFLOP/s, NVLink 4 900 GB/s both ways, one NDR 400 Gb/s HCA per GPU (DGX H100/H200).
PRESETS = {
    "a100-80gb": Hardware("a100-80gb", 312.0, 80.0, 8, 300.0, 25.0),
    "h100": Hardware("h100", 989.0, 80.0, 8, 450.0, 50.0),
    "h200": Hardware("h200", 989.0, 141.0, 8, 450.0, 50.0),
}
DEFAULT_HARDWARE = "a100-80gb"


@dataclass
class Collective:
    kind: str  # grad_reduce, param_gather, zero3_forward_gather, zero3_backward_gather, grad_reduce_scatter, all_to_all
    op: str  # all_reduce, all_gather, reduce_scatter, all_to_all
    group_size: int
    buffer_bytes: float  # the whole buffer the collective works on, per call
    calls: int  # per optimizer step
    intra_node: bool
    overlapped: bool

    def bytes_per_gpu(self) -> float:
        """Through one GPU's link per step: ring volumes."""
        if self.group_size <= 1:
            return 0.0
        factor = (self.group_size - 1) / self.group_size * (2 if self.op == "all_reduce" else 1)
        return factor * self.buffer_bytes * self.calls


@dataclass
class CommEstimate:
    compute_s: float
    step_s: float
    overlap: float
    bound: str  # "compute" or "communication"
    seconds: dict[str, float] = field(default_factory=dict)  # by kind
    bytes_per_gpu: dict[str, float] = field(default_factory=dict)  # by kind

    @property
    def comm_s(self) -> float:
        return sum(self.seconds.values())


def _grad_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def moe_layer_tokens(cfg: ModelConfig, micro_batch: int, example: Example) -> list[int]:
    """Tokens each MoE layer routes per micro-batch: the encoder's over the inputs, the decoder's over its own."""
    if cfg.moe is None:
        return []
    own = example.targets if cfg.arch == "encoder_decoder" else example.inputs
    out = [micro_batch * own for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]
    if cfg.arch == "encoder_decoder":
        out += [micro_batch * example.inputs for i in range(cfg.encoder_layers) if cfg.is_moe_layer(i)]
    return out


def collectives(cfg: ModelConfig, zero_stage: int, dp_size: int, ep_size: int, micro_batch: int, accum: int,
                example: Example, precision: str, gpus_per_node: int, hpz: int = 1) -> list[Collective]:
    """Every collective of one optimizer step on one GPU, as DeepSpeed and trainer/expert_parallel.py issue them."""
    counts = param_counts(cfg)
    w = g = _grad_bytes(precision)
    inside = lambda n: n <= gpus_per_node  # noqa: E731 - consecutive ranks of a group share a node while they fit
    edp = dp_size // ep_size  # ranks holding the same experts, strided by ep_size
    edp_inside = dp_size <= gpus_per_node
    # (params, group size, whether the group stays in a node): dense over all ranks, experts over their replicas.
    shards = [(counts.total - counts.expert, dp_size, inside(dp_size)), (counts.expert / ep_size, edp, edp_inside)]
    # The engine lets two modules stay gathered (trainer.zero_memory.zero_settings); a model no bigger stays
    # gathered from forward to backward and DeepSpeed does not gather it again.
    whole_model_stays_gathered = counts.total <= 2 * zero3_layer_elements(cfg)
    out = []
    for params, n, intra in shards:
        if params == 0:
            continue
        if zero_stage < 3:
            reductions = accum if zero_stage == 2 else 1
            out.append(Collective("grad_reduce", "all_reduce", n, params * g, reductions, intra, False))
            if zero_stage > 0:
                out.append(Collective("param_gather", "all_gather", n, params * w, 1, intra, False))
            continue
        out.append(Collective("zero3_forward_gather", "all_gather", n, params * w, accum, intra, True))
        if whole_model_stays_gathered:
            pass
        elif hpz > 1:
            out.append(Collective("zero3_backward_gather", "all_gather", hpz, params * w, accum, inside(hpz), True))
        else:
            out.append(Collective("zero3_backward_gather", "all_gather", n, params * w, accum, intra, True))
        out.append(Collective("grad_reduce_scatter", "reduce_scatter", n, params * g, accum, intra, True))
    if ep_size > 1:
        for tokens in moe_layer_tokens(cfg, micro_batch, example):
            slots = cfg.moe.capacity_factor * tokens * cfg.d_model * w
            out.append(Collective("all_to_all", "all_to_all", ep_size, slots, 4 * accum, inside(ep_size), False))
    return out


def estimate(colls: list[Collective], compute_s: float, hw: Hardware, overlap: float) -> CommEstimate:
    """Step time: compute, the exposed collectives, and the overlappable ones beyond `overlap` x compute."""
    seconds: dict[str, float] = {}
    volume: dict[str, float] = {}
    hidden = exposed = 0.0
    for c in colls:
        moved = c.bytes_per_gpu()
        t = moved / ((hw.nvlink_gbps if c.intra_node else hw.ib_gbps) * 1e9)
        seconds[c.kind] = seconds.get(c.kind, 0.0) + t
        volume[c.kind] = volume.get(c.kind, 0.0) + moved
        if c.overlapped:
            hidden += t
        else:
            exposed += t
    step = compute_s + exposed + max(0.0, hidden - overlap * compute_s)
    comm = hidden + exposed
    return CommEstimate(compute_s=compute_s, step_s=step, overlap=overlap,
                        bound="communication" if comm > compute_s else "compute", seconds=seconds,
                        bytes_per_gpu=volume)


def hardware(name: Optional[str], **overrides: Optional[float]) -> Hardware:
    """A preset with any figure replaced (None leaves it); a clear error naming the presets."""
    key = (name or DEFAULT_HARDWARE).lower()
    if key not in PRESETS:
        raise ValueError(f"hardware: {name!r} is not a preset ({', '.join(PRESETS)})")
    base = PRESETS[key]
    values = {k: v for k, v in overrides.items() if v is not None}
    for k, v in values.items():
        if v <= 0:
            raise ValueError(f"{k}: {v} must be > 0")
    if "gpus_per_node" in values:
        values["gpus_per_node"] = int(values["gpus_per_node"])
    return Hardware(**{**base.__dict__, **values})
