"""Communication in a training step: what DeepSpeed and our expert-parallel layers move per GPU, in how
many calls, and how long it takes on a cluster of nodes (NVLink inside a node, InfiniBand between nodes).

What DeepSpeed 0.19 issues (runtime/engine.py allreduce_gradients, zero/stage_1_and_2.py, zero/stage3.py):
- ZeRO-0 and ZeRO-1 reduce gradients once per step, at the accumulation boundary; ZeRO-2 reduces them
  in backward hooks at every micro-batch. Both stages 1 and 2 all-reduce each gradient bucket (the default
  `use_multi_rank_bucket_allreduce`) and keep their partition: all-reduce volume, not reduce-scatter's.
  One call per bucket: reduce_bucket_size elements (ZeRO-0: the engine's 5e8-element buffers).
- ZeRO-1/2 all-gather the updated 16-bit weights once per step, after the optimizer: one call per
  optimizer parameter group (trainer/engine.py param_groups: decayed matrices, and the undecayed rest).
- ZeRO-3 all-gathers each module's weights in forward and again in backward, and reduce-scatters the
  gradients, at every micro-batch; gradient accumulation multiplies all three. A fetch gathers the
  module and the ones prefetched with it in one call, up to stage3_prefetch_bucket_size elements; the
  reduce-scatters go in reduce_bucket_size buckets. (A model within the engine's
  stage3_max_live_parameters, two modules, stays gathered and skips the backward gather.) With ZeRO++'s
  `zero_hpz_partition_size` the backward gather reads a secondary copy split inside the node.
- Gradients travel in the training precision (DeepSpeed's communication_data_type: bf16 under bf16).
- Expert parallelism: 4 all-to-alls per MoE layer per micro-batch (dispatch and combine, forward and
  backward), each of the [experts x capacity, d] slot buffer, and one of the per-expert token counts;
  expert gradients are reduced over the dp/ep ranks that hold the same experts.
Not counted: the step's gradient-norm and overflow all-reduces and ZeRO-3's gather of its persistent small
parameters after the step (a few bytes or KB each).

Time is alpha-beta: each call pays the link's latency, and the ring volume goes at its bandwidth. Ring
collectives move (n-1)/n of the buffer through each GPU's link (all-gather, reduce-scatter, all-to-all)
or twice that (all-reduce). A group inside one node runs on NVLink, one spanning nodes at the per-GPU
InfiniBand figures. Ranks are placed as DeepSpeed groups them: data-parallel, expert-parallel and hpz
groups are consecutive ranks, expert-data-parallel groups stride by ep_size.

Overlap: DeepSpeed prefetches ZeRO-3's gathers and overlaps its reduce-scatters with compute
(overlap_comm defaults on at stage 3), so those hide behind `overlap` x compute time. ZeRO-0/1/2
reductions (overlap_comm off in our engine), the post-step weight gather and the all-to-alls (the
experts wait for their tokens) are exposed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import floor
from typing import Optional

from trainer.config import ModelConfig
from trainer.model.counting import Example, param_counts
from trainer.zero_memory import DEEPSPEED_BUCKET_ELEMENTS, zero3_layer_elements, zero_settings


@dataclass(frozen=True)
class Hardware:
    """One GPU type in nodes of `gpus_per_node`; bandwidths are GB/s per GPU, one direction; latencies are
    microseconds per collective call."""

    name: str
    gpu_tflops: float  # peak dense bf16
    gpu_memory_gb: float
    gpus_per_node: int
    nvlink_gbps: float
    ib_gbps: float
    nvlink_latency_us: float
    ib_latency_us: float


# Datasheets: A100 SXM 312 TFLOP/s, NVLink 3 600 GB/s both ways, one HDR 200 Gb/s HCA per GPU (DGX A100);
# H100/H200 SXM 989 TFLOP/s, NVLink 4 900 GB/s both ways, one NDR 400 Gb/s HCA per GPU (DGX H100/H200).
# Latency per call: NCCL's tuning model (src/graph/tuning.cc), Simple-protocol ring: 8.4 us + 3.4 per NVLink hop
# (7 in a node: ~30 us), 9.6 per network hop (a ring over two nodes: ~60 us).
PRESETS = {
    "a100-80gb": Hardware("a100-80gb", 312.0, 80.0, 8, 300.0, 25.0, 30.0, 60.0),
    "h100": Hardware("h100", 989.0, 80.0, 8, 450.0, 50.0, 30.0, 60.0),
    "h200": Hardware("h200", 989.0, 141.0, 8, 450.0, 50.0, 30.0, 60.0),
}
DEFAULT_HARDWARE = "a100-80gb"


@dataclass
class Collective:
    kind: str  # grad_reduce, param_gather, zero3_forward_gather, zero3_backward_gather, grad_reduce_scatter, all_to_all
    op: str  # all_reduce, all_gather, reduce_scatter, all_to_all
    group_size: int
    buffer_bytes: float  # the whole buffer the collective works on, per repetition
    calls: int  # repetitions per optimizer step
    intra_node: bool
    overlapped: bool
    buckets: int = 1  # calls each repetition is split into: DeepSpeed's buckets, parameter groups or fetches

    def bytes_per_gpu(self) -> float:
        """Through one GPU's link per step: ring volumes."""
        if self.group_size <= 1:
            return 0.0
        factor = (self.group_size - 1) / self.group_size * (2 if self.op == "all_reduce" else 1)
        return factor * self.buffer_bytes * self.calls

    def seconds(self, latency_s: float, bytes_per_s: float) -> float:
        """Alpha-beta: every call's latency, then the ring volume at the link's bandwidth."""
        if self.group_size <= 1:
            return 0.0
        return self.calls * self.buckets * latency_s + self.bytes_per_gpu() / bytes_per_s


@dataclass
class CommEstimate:
    compute_s: float
    step_s: float
    overlap: float
    bound: str  # "compute" or "communication"
    seconds: dict[str, float] = field(default_factory=dict)  # by kind
    bytes_per_gpu: dict[str, float] = field(default_factory=dict)  # by kind
    calls: dict[str, int] = field(default_factory=dict)  # by kind, per step

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


def _bucketed(kind: str, op: str, n: int, params: float, bucket: int, elem: int, calls: int, intra: bool,
              overlapped: bool) -> list[Collective]:
    """`params` sent as DeepSpeed fills its buckets, each sent before a gradient would overflow it: full
    buckets, then the rest."""
    full, rest = divmod(params, bucket)
    return [Collective(kind, op, n, part * elem, calls, intra, overlapped, buckets)
            for part, buckets in ((full * bucket, int(full)), (rest, 1)) if part > 0]


def _zero3(piece: float, n: int, intra: bool, accum: int, elem: int, cfg: ModelConfig, hpz: int,
           gpus_per_node: int) -> list[Collective]:
    """One piece's ZeRO-3 gathers and reduce-scatters, at every micro-batch. A fetch takes modules until the
    prefetch bucket is full, the last one crossing it."""
    settings = zero_settings(cfg, 3)
    fetches = max(1, floor(piece / settings["stage3_prefetch_bucket_size"]))
    out = [Collective("zero3_forward_gather", "all_gather", n, piece * elem, accum, intra, True, fetches)]
    # The engine lets two modules stay gathered (zero_settings); a model no bigger stays gathered from forward
    # to backward and DeepSpeed does not gather it again.
    if param_counts(cfg).total > 2 * zero3_layer_elements(cfg):
        group, inside = (hpz, hpz <= gpus_per_node) if hpz > 1 else (n, intra)
        out.append(Collective("zero3_backward_gather", "all_gather", group, piece * elem, accum, inside, True,
                              fetches))
    return out + _bucketed("grad_reduce_scatter", "reduce_scatter", n, piece, settings["reduce_bucket_size"], elem,
                           accum, intra, True)


def collectives(cfg: ModelConfig, zero_stage: int, dp_size: int, ep_size: int, micro_batch: int, accum: int,
                example: Example, precision: str, gpus_per_node: int, hpz: int = 1) -> list[Collective]:
    """Every collective of one optimizer step on one GPU, as DeepSpeed and trainer/expert_parallel.py issue them."""
    counts = param_counts(cfg)
    w = _grad_bytes(precision)  # weights and gradients alike
    inside = lambda n: n <= gpus_per_node  # noqa: E731 - consecutive ranks of a group share a node while they fit
    edp = dp_size // ep_size  # ranks holding the same experts, strided by ep_size
    dense, expert = counts.total - counts.expert, counts.expert / ep_size
    # (params, group size, whether the group stays in a node, pieces): dense weights over all ranks, experts over
    # their replicas. A piece is (params, optimizer parameter groups): the embeddings (undecayed, with the norms and
    # biases; ZeRO-3 fetches them on their own) and the blocks (decayed matrices); experts' matrices and biases.
    shards = [(dense, dp_size, inside(dp_size), [(counts.embedding, 1), (dense - counts.embedding, 1)]),
              (expert, edp, dp_size <= gpus_per_node, [(expert, 2 if cfg.bias else 1)])]
    # ZeRO-0 reduces in the engine's own 5e8-element buffers, ZeRO-1/2 in the trainer's reduce_bucket_size.
    reduce_bucket = zero_settings(cfg, zero_stage)["reduce_bucket_size"] if zero_stage else DEEPSPEED_BUCKET_ELEMENTS
    out = []
    for params, n, intra, pieces in shards:
        if params == 0:
            continue
        if zero_stage == 3:
            for piece, _ in pieces:
                out += _zero3(piece, n, intra, accum, w, cfg, hpz, gpus_per_node) if piece else []
            continue
        reductions = accum if zero_stage == 2 else 1
        out += _bucketed("grad_reduce", "all_reduce", n, params, reduce_bucket, w, reductions, intra, False)
        if zero_stage > 0:
            out += [Collective("param_gather", "all_gather", n, piece * w, 1, intra, False, groups)
                    for piece, groups in pieces if piece]
    if ep_size > 1:
        for tokens in moe_layer_tokens(cfg, micro_batch, example):
            slots = cfg.moe.capacity_factor * tokens * cfg.d_model * w
            out.append(Collective("all_to_all", "all_to_all", ep_size, slots, 4 * accum, inside(ep_size), False))
            counts_bytes = cfg.moe.num_experts * 8  # int64 tokens per expert, sent in forward only
            out.append(Collective("all_to_all", "all_to_all", ep_size, counts_bytes, accum, inside(ep_size), False))
    return out


def estimate(colls: list[Collective], compute_s: float, hw: Hardware, overlap: float) -> CommEstimate:
    """Step time: compute, the exposed collectives, and the overlappable ones beyond `overlap` x compute."""
    seconds: dict[str, float] = {}
    volume: dict[str, float] = {}
    calls: dict[str, int] = {}
    hidden = exposed = 0.0
    for c in colls:
        latency_us, gbps = (hw.nvlink_latency_us, hw.nvlink_gbps) if c.intra_node else (hw.ib_latency_us, hw.ib_gbps)
        t = c.seconds(latency_us * 1e-6, gbps * 1e9)
        seconds[c.kind] = seconds.get(c.kind, 0.0) + t
        volume[c.kind] = volume.get(c.kind, 0.0) + c.bytes_per_gpu()
        calls[c.kind] = calls.get(c.kind, 0) + (c.calls * c.buckets if c.group_size > 1 else 0)
        if c.overlapped:
            hidden += t
        else:
            exposed += t
    step = compute_s + exposed + max(0.0, hidden - overlap * compute_s)
    comm = hidden + exposed
    return CommEstimate(compute_s=compute_s, step_s=step, overlap=overlap,
                        bound="communication" if comm > compute_s else "compute", seconds=seconds,
                        bytes_per_gpu=volume, calls=calls)


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
