"""The parallelism planner: a layout (ZeRO stage, expert-parallel size, micro batch, gradient
accumulation, activation checkpointing) that fits N GPUs of M GB, with the memory per GPU and
the step time it implies, or a clear reason why nothing fits. Of the layouts that fit, the one with
the shortest estimated step wins: compute at an assumed MFU plus the communication cluster/comm.py
models (ZeRO's gathers and reductions, the expert all-to-alls) on the chosen hardware.

Every GPU is a data-parallel rank (the engine has ZeRO and expert parallelism, no tensor or
pipeline parallelism). Model states come from `trainer.zero_memory.memory_per_gpu`; this
module adds what a training step holds besides them, following the model code in
trainer/model/: the tensors autograd saves per block, the cross-entropy buffers over the
vocabulary, MoE dispatch buffers, and DeepSpeed's communication buffers.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Optional

from cluster.comm import CommEstimate, Hardware, collectives, estimate, hardware
from trainer.config import ModelConfig, TrainConfig
from trainer.model.counting import Example, flops_per_example, param_counts, training_example
from trainer.zero_memory import DEEPSPEED_BUCKET_ELEMENTS, comm_bucket_elements, memory_per_gpu, zero3_layer_elements

INIT_CHUNK = 1 << 20  # trainer.initialize.CHUNK, not imported here: that would load torch for every plan

Precision = Literal["bf16", "fp16", "fp32"]
GB = 1e9
# Kept free on every GPU for the CUDA context, allocator fragmentation and NCCL: plans fill 90%.
RESERVED_FRACTION = 0.10
# Step times within this fraction, or these seconds, of the fastest count as a tie, which goes to the simpler
# layout: assumed MFU and per-call latencies make differences of milliseconds below the model's resolution.
TIE_FRACTION = 0.01
TIE_SECONDS = 0.01
# GPT-3 Table 2.1 batch sizes (tokens) by total parameters, used when the config has no train section.
GPT3_BATCH_TOKENS = ((1e9, 0.5e6), (5e9, 1e6), (50e9, 2e6), (float("inf"), 3.2e6))


@dataclass
class Layout:
    zero_stage: int
    ep_size: int
    dp_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    zero_hpz_partition_size: int = 1  # ZeRO++ secondary weight partition inside a node (ZeRO-3 only)

    def describe(self) -> str:
        hpz = f" with hpz {self.zero_hpz_partition_size}" if self.zero_hpz_partition_size > 1 else ""
        return (f"ZeRO-{self.zero_stage}{hpz}, expert parallel {self.ep_size}, micro batch {self.micro_batch_size}, "
                f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}")


@dataclass
class Memory:
    """Bytes per GPU at the peak of a training step."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # saved for backward, plus the cross-entropy buffers over the vocabulary
    moe_all_to_all: float  # token send + receive buffers of one MoE layer in flight (ep > 1)
    buffers: float  # DeepSpeed gradient buckets, and ZeRO-3's gathered weights of the live layers
    construction: float = 0.0  # building the model: the rank's share of the weights (trainer/engine.py build_model)
    checkpoint_save: float = 0.0  # saving: model states, with activations freed, plus one tensor's write buffer
    hpz_secondary: float = 0.0  # ZeRO++: the 16-bit weights again, split over the hpz group only

    @property
    def step(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.moe_all_to_all + self.buffers
                + self.hpz_secondary)

    @property
    def total(self) -> float:
        """The peak of the run: a step's, or construction's or a checkpoint save's where they are higher."""
        return max(self.step, self.construction, self.checkpoint_save)


@dataclass
class Plan:
    feasible: bool
    model: str
    gpus: int
    gpu_memory_gb: float
    seq_len: int  # input positions per sequence (an encoder-decoder's encoder input)
    global_batch_size: int
    precision: str
    assumed_mfu: float
    gpu_tflops: float
    budget_bytes: float
    hardware: Optional[Hardware] = None
    comm_overlap: float = 1.0  # the fraction of compute time overlappable communication can hide behind
    targets_len: int = 0  # positions the decoder predicts (a decoder-only model: seq_len)
    tokens_per_sequence: int = 0  # raw tokens a sequence takes from the shards: what tokens/s counts
    layout: Optional[Layout] = None
    memory: Optional[Memory] = None
    flops_per_step: float = 0.0
    step_time_s: float = 0.0  # compute, plus the communication that compute does not hide
    compute_time_s: float = 0.0
    comm_time_s: float = 0.0
    comm_s_by_kind: dict[str, float] = field(default_factory=dict)
    comm_bytes_per_gpu_by_kind: dict[str, float] = field(default_factory=dict)
    comm_calls_by_kind: dict[str, int] = field(default_factory=dict)  # collective calls per step
    bound: str = ""  # "compute" or "communication": which takes longer per step
    layouts_fitting: int = 0
    tokens_per_s: float = 0.0
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        """`--set` arguments that make a train config use this layout."""
        if self.layout is None:
            return []
        lay = self.layout
        return [f"parallel.zero_stage={lay.zero_stage}", f"parallel.ep_size={lay.ep_size}",
                f"train.micro_batch_size={lay.micro_batch_size}", f"train.global_batch_size={self.global_batch_size}",
                f"train.activation_checkpointing={str(lay.activation_checkpointing).lower()}"] + (
                    [f"parallel.zero_hpz_partition_size={lay.zero_hpz_partition_size}"]
                    if lay.zero_hpz_partition_size > 1 else [])

    def to_json(self) -> dict:
        out = asdict(self)
        if self.memory is not None:
            out["memory"]["step"] = self.memory.step
        out["memory"]["total"] = self.memory.total
        out["set"] = self.overrides()
        return out


def _element_bytes(precision: Precision) -> int:
    """Bytes of one activation, 16-bit weight or gradient element."""
    return 4 if precision == "fp32" else 2


def _hidden_elements(cfg: ModelConfig) -> int:
    """Elements a dense FFN saves per hidden unit: ReLU's output (its backward and c_proj's share it),
    GELU's input and output, gated GELU's fused projection (2), GELU output and product."""
    return {"relu": 1, "gelu": 2, "gated-gelu": 4}[cfg.activation]


def block_element_bytes(cfg: ModelConfig, layer: int, tokens: int, precision: Precision,
                        memory_tokens: int = 0, seq_len: int = 0) -> float:
    """Bytes autograd saves for one block's backward (trainer/model/gpt.py, encdec.py, attention.py, moe.py).

    Per token, with i = n_head * d_kv: each attention's norm input and output (2d), q/k/v (3i), the fused
    attention's output and its contiguous copy for the projection (2i); a banded layer over sequences longer
    than its window (trainer/model/local_attention.py) 5i more: the blocked queries, the key and value
    block pairs (twice the keys and values) and that attention's output; a decoder block's cross-attention
    (`memory_tokens` > 0) the same but for keys and values, which are 2i per encoder position. The FFN's
    norm input and output (2d) and its hidden units (`_hidden_elements`); a Switch FFN instead keeps the
    routed [experts, capacity, d] buffer, the expert hidden pre/post activation and the gathered output,
    its router in float32. With dropout, a one-byte mask per residual branch."""
    d, a, inner = cfg.d_model, _element_bytes(precision), cfg.n_head * cfg.head_dim
    banded = cfg.attention == "alternating" and layer % 2 == 1 and seq_len > cfg.local_window
    attention = tokens * (2 * d + (10 if banded else 5) * inner)
    if memory_tokens:
        attention += tokens * (2 * d + 3 * inner) + memory_tokens * 2 * inner
    masks = tokens * d * (3 if memory_tokens else 2) if cfg.dropout > 0 else 0
    if not cfg.is_moe_layer(layer):
        return a * (attention + tokens * (2 * d + _hidden_elements(cfg) * cfg.ff_width)) + masks
    routed = cfg.moe.capacity_factor * tokens
    router_fp32 = 4 * tokens * (2 * cfg.moe.num_experts + (d if a != 4 else 0))
    return a * (attention + tokens * 3 * d + routed * (d + 2 * cfg.expert_ff_width)) + router_fp32 + masks


def logits_bytes(cfg: ModelConfig, tokens: int, precision: Precision) -> float:
    """Peak of the loss over the vocabulary. Full logits (model.loss_chunk_tokens 0): the logits, and in
    float32 the log-softmax output, the gradient arriving from the NLL loss and the gradient it produces
    (alive together). Chunked (trainer/model/loss.py): one chunk's logits, their float32 copy (16-bit
    only) and logsumexp's float32 temporary, plus the float32 head-weight gradient and the hidden
    states' gradient the loss computes in its forward and keeps until backward."""
    a, chunk = _element_bytes(precision), cfg.loss_chunk_tokens
    if not chunk:
        return tokens * cfg.vocab_size * (a + 12)
    chunk_logits = min(tokens, chunk) * cfg.vocab_size * (a + 4 + (4 if a != 4 else 0))
    return chunk_logits + 4 * cfg.vocab_size * cfg.d_model + a * tokens * cfg.d_model


def _as_example(cfg: ModelConfig, example: Example | int) -> Example:
    """An Example, or an input length: the example `training_example` makes of it."""
    return example if isinstance(example, Example) else training_example(cfg, example)


def _stack_bytes(cfg: ModelConfig, layers: int, tokens: int, precision: Precision, checkpointing: bool,
                 memory_tokens: int = 0, seq_len: int = 0) -> float:
    """One stack's blocks; checkpointed blocks keep only their input, then recompute one block at a time."""
    per_block = [block_element_bytes(cfg, i, tokens, precision, memory_tokens, seq_len) for i in range(layers)]
    if checkpointing:
        return layers * _element_bytes(precision) * tokens * cfg.d_model + max(per_block)
    return sum(per_block)


def activation_bytes(cfg: ModelConfig, micro_batch: int, example: Example | int, precision: Precision,
                     checkpointing: bool) -> float:
    """Saved for backward in one micro-batch. An encoder-decoder's encoder runs over its inputs, its
    decoder over the targets (cross-attending to the inputs), and the loss over the targets' logits."""
    ex, a = _as_example(cfg, example), _element_bytes(precision)
    inputs, targets = micro_batch * ex.inputs, micro_batch * ex.targets
    if cfg.arch == "decoder":
        blocks = _stack_bytes(cfg, cfg.n_layer, inputs, precision, checkpointing, seq_len=ex.inputs)
        return blocks + 2 * a * inputs * cfg.d_model + logits_bytes(cfg, inputs, precision)
    blocks = (_stack_bytes(cfg, cfg.encoder_layers, inputs, precision, checkpointing)
              + _stack_bytes(cfg, cfg.n_layer, targets, precision, checkpointing, memory_tokens=inputs))
    final_norms = 2 * a * (inputs + targets) * cfg.d_model  # each stack's last norm, input and output
    # T5's relative bias, (1, heads, T, T) per stack, and the decoder's copy with the causal mask folded in.
    position_bias = a * cfg.n_head * (ex.inputs ** 2 + 2 * ex.targets ** 2) if cfg.pos_embedding == "relative" else 0
    return blocks + final_norms + position_bias + logits_bytes(cfg, targets, precision)


def estimate_memory(cfg: ModelConfig, layout: Layout, example: Example | int, precision: Precision) -> Memory:
    """Memory per GPU for one training step of `example` (an Example, or an input length)."""
    ex = _as_example(cfg, example)
    states = memory_per_gpu(cfg, layout.zero_stage, layout.dp_size, layout.ep_size, precision)
    tokens = layout.micro_batch_size * max(ex.inputs, ex.targets)  # the longer stack's Switch layers
    a = _element_bytes(precision)
    all_to_all = 0.0
    if cfg.moe is not None and layout.ep_size > 1:
        all_to_all = 2 * cfg.moe.capacity_factor * tokens * cfg.d_model * a
    buffers = 0.0
    if layout.zero_stage in (1, 2):  # the flat fp32 gradient bucket, allocated even on one rank
        buffers = comm_bucket_elements(cfg) * 4
    elif layout.zero_stage == 3:  # a module's gradient bucket, and two modules gathered (running, prefetched)
        buffers = 3 * zero3_layer_elements(cfg) * a
    elif layout.dp_size > 1:
        buffers = min(DEEPSPEED_BUCKET_ELEMENTS, states.weights / a) * a
    # No rank builds more than its share: ZeRO-3 partitions each parameter as it is created, expert parallelism
    # allocates only the local experts, and the initial values are drawn a chunk at a time (trainer/initialize.py).
    construction = states.weights + 4 * INIT_CHUNK
    # Each rank writes only the fragments it owns, straight from its fp32 masters; without partitioned masters
    # (ZeRO-0 in fp16) it converts its 16-bit weights to fp32 one tensor at a time.
    write_buffer = 4 * largest_param(cfg, layout.ep_size) if layout.zero_stage == 0 and precision == "fp16" else 0
    checkpoint_save = states.weights + states.grads + states.optimizer + buffers + write_buffer
    hpz = layout.zero_hpz_partition_size
    secondary = param_counts(cfg).total * a / hpz if hpz > 1 else 0.0
    return Memory(weights=states.weights, grads=states.grads, optimizer=states.optimizer,
                  activations=activation_bytes(cfg, layout.micro_batch_size, ex, precision,
                                               layout.activation_checkpointing),
                  moe_all_to_all=all_to_all, buffers=buffers, construction=construction,
                  checkpoint_save=checkpoint_save, hpz_secondary=secondary)


def largest_param(cfg: ModelConfig, ep_size: int) -> int:
    """Elements of a rank's largest parameter: the (tied) token embedding, or a layer's stacked local experts."""
    experts = cfg.moe.num_experts // ep_size * cfg.d_model * cfg.expert_ff_width if cfg.moe is not None else 0
    return max(cfg.vocab_size * cfg.d_model, experts, cfg.d_model * cfg.ff_width)


def step_time_s(cfg: ModelConfig, example: Example | int, global_batch: int, gpus: int, mfu: float, tflops: float,
                checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs per step, seconds): model FLOPs over gpus x peak x MFU; recomputing the forward
    pass under activation checkpointing costs another third of the work at the same utilisation."""
    flops = flops_per_example(cfg, _as_example(cfg, example)) * global_batch
    return flops, flops / (gpus * tflops * 1e12 * mfu) * (4 / 3 if checkpointing else 1)


def default_global_batch(cfg: ModelConfig, example: Example) -> int:
    total = param_counts(cfg).total
    tokens = next(t for limit, t in GPT3_BATCH_TOKENS if total < limit)
    return max(1, round(tokens / example.raw_tokens))


def expert_parallel_sizes(cfg: ModelConfig, gpus: int) -> list[int]:
    """The sizes the trainer accepts for this model on `gpus` data-parallel ranks."""
    if cfg.moe is None:
        return [1]
    return [e for e in range(1, cfg.moe.num_experts + 1) if cfg.expert_parallel_error(e, gpus) is None]


def candidate_layouts(cfg: ModelConfig, gpus: int, global_batch: int, gpus_per_node: int = 1):
    """Simplest first (the order breaks ties in step time): no recompute before recompute, lower ZeRO
    stages, ZeRO-3 without hpz before with, fewer expert-parallel ranks, larger micro batches. ZeRO++'s
    hpz partitions over one node's GPUs, when the ranks span whole nodes."""
    per_rank = global_batch // gpus
    micro_batches = sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True)
    # The trainer refuses ZeRO-3 with experts (RunConfig.for_world).
    hpz = [1, gpus_per_node] if 1 < gpus_per_node < gpus and gpus % gpus_per_node == 0 else [1]
    stages = [(0, 1), (1, 1), (2, 1)] + ([(3, h) for h in hpz] if cfg.moe is None else [])
    for ckpt, (stage, h), ep, micro in itertools.product((False, True), stages, expert_parallel_sizes(cfg, gpus),
                                                         micro_batches):
        yield Layout(stage, ep, gpus, micro, per_rank // micro, ckpt, h)


def _rounded_batch(global_batch: int, gpus: int) -> int:
    """The nearest multiple of the data-parallel size (at least one sequence per GPU)."""
    return max(gpus, round(global_batch / gpus) * gpus)


def layout_time(cfg: ModelConfig, layout: Layout, ex: Example, global_batch: int, precision: Precision,
                mfu: float, hw: Hardware, overlap: float) -> tuple[float, CommEstimate]:
    """(FLOPs per step, compute and communication times) of one layout on `hw`."""
    flops, compute = step_time_s(cfg, ex, global_batch, layout.dp_size, mfu, hw.gpu_tflops,
                                 layout.activation_checkpointing)
    colls = collectives(cfg, layout.zero_stage, layout.dp_size, layout.ep_size, layout.micro_batch_size,
                        layout.gradient_accumulation_steps, ex, precision, hw.gpus_per_node,
                        layout.zero_hpz_partition_size)
    return flops, estimate(colls, compute, hw, overlap)


def make_plan(cfg: ModelConfig, gpus: int, gpu_memory_gb: float, *, seq_len: Optional[int] = None,
              global_batch: Optional[int] = None, precision: Precision = "bf16", mfu: float = 0.4,
              gpu_tflops: Optional[float] = None, train: Optional[TrainConfig] = None,
              hw: Optional[Hardware] = None, comm_overlap: float = 1.0) -> Plan:
    """`train` supplies the objective (an encoder-decoder's target length and raw tokens per sequence);
    without it an encoder-decoder is planned for T5's span corruption of seq_len inputs. `hw` defaults to
    the A100-80GB preset; `gpu_tflops` overrides its peak."""
    hw = hw or hardware(None)
    if gpu_tflops:
        hw = replace(hw, gpu_tflops=gpu_tflops)
    ex = training_example(cfg, seq_len, train)
    wanted = global_batch or default_global_batch(cfg, ex)
    batch = _rounded_batch(wanted, gpus)
    plan = Plan(feasible=False, model=cfg.name, gpus=gpus, gpu_memory_gb=gpu_memory_gb, seq_len=ex.inputs,
                global_batch_size=batch, precision=precision, assumed_mfu=mfu, gpu_tflops=hw.gpu_tflops,
                budget_bytes=gpu_memory_gb * GB * (1 - RESERVED_FRACTION), targets_len=ex.targets,
                tokens_per_sequence=ex.raw_tokens, hardware=hw, comm_overlap=comm_overlap)
    if batch != wanted:
        plan.notes.append(f"global batch {wanted} -> {batch} sequences: a multiple of the {gpus} data-parallel ranks")
    smallest: Optional[tuple[Layout, Memory]] = None
    fitting = []  # (layout, memory, flops, CommEstimate), simplest first
    for layout in candidate_layouts(cfg, gpus, batch, hw.gpus_per_node):
        memory = estimate_memory(cfg, layout, ex, precision)
        if smallest is None or memory.total < smallest[1].total:
            smallest = (layout, memory)
        if memory.total <= plan.budget_bytes:
            fitting.append((layout, memory, *layout_time(cfg, layout, ex, batch, precision, mfu, hw, comm_overlap)))
    if not fitting:
        plan.layout, plan.memory = smallest
        plan.reason = _why_infeasible(cfg, plan, smallest, precision)
        return plan
    fastest = min(f[3].step_s for f in fitting)
    layout, memory, flops, est = next(f for f in fitting if f[3].step_s <= max(fastest * (1 + TIE_FRACTION), fastest + TIE_SECONDS))
    plan.feasible, plan.layout, plan.memory, plan.flops_per_step = True, layout, memory, flops
    plan.step_time_s, plan.compute_time_s, plan.comm_time_s = est.step_s, est.compute_s, est.comm_s
    plan.bound, plan.comm_s_by_kind, plan.comm_bytes_per_gpu_by_kind = est.bound, est.seconds, est.bytes_per_gpu
    plan.comm_calls_by_kind = est.calls
    plan.tokens_per_s = batch * ex.raw_tokens / plan.step_time_s
    plan.layouts_fitting = len(fitting)
    plan.reason = _why_chosen(cfg, layout, fitting, ex, precision, plan.budget_bytes)
    return plan


def _why_chosen(cfg: ModelConfig, chosen: Layout, fitting: list, ex: Example, precision: Precision,
                budget: float) -> str:
    """The runner-up's step time, then why each simpler setting was passed over: too big, or slower."""
    others = sorted((f for f in fitting if f[0] is not chosen), key=lambda f: f[3].step_s)
    head = f"the fastest estimated step of the {len(fitting)} layouts that fit"
    if others:
        head += f" (next: {others[0][0].describe()}, {others[0][3].step_s:.2f} s)"
    simpler = []  # (name, which fitting layouts have it, its smallest layout to size when none fits)
    if chosen.zero_stage > 0:
        lower = Layout(chosen.zero_stage - 1, chosen.ep_size, chosen.dp_size, 1, 1, True)
        simpler.append((f"ZeRO-{lower.zero_stage}", lambda lay: lay.zero_stage == lower.zero_stage, lower))
    if chosen.zero_hpz_partition_size > 1:
        simpler.append(("ZeRO-3 without hpz", lambda lay: lay.zero_stage == 3 and lay.zero_hpz_partition_size == 1,
                        Layout(3, 1, chosen.dp_size, 1, 1, True)))
    smaller_ep = [e for e in expert_parallel_sizes(cfg, chosen.dp_size) if e < chosen.ep_size]
    if smaller_ep:
        fewer = Layout(chosen.zero_stage, smaller_ep[-1], chosen.dp_size, 1, 1, chosen.activation_checkpointing)
        simpler.append((f"expert parallel {fewer.ep_size}", lambda lay: lay.ep_size == fewer.ep_size, fewer))
    if chosen.activation_checkpointing:
        plain = Layout(chosen.zero_stage, chosen.ep_size, chosen.dp_size, 1, 1, False)
        simpler.append(("without activation checkpointing", lambda lay: not lay.activation_checkpointing, plain))
    reasons = [head]
    for name, matches, smallest in simpler:
        alternatives = [f[3].step_s for f in fitting if matches(f[0])]
        if alternatives:
            reasons.append(f"{name} fits but its fastest step is {min(alternatives):.2f} s")
        else:
            need = estimate_memory(cfg, smallest, ex, precision).total
            reasons.append(f"{name} would need {need / GB:.1f} GB per GPU even with micro batch 1 "
                           f"(over the {budget / GB:.1f} GB budget)")
    return "; ".join(reasons)


def min_gpus(cfg: ModelConfig, gpu_memory_gb: float, example: Example | int, precision: Precision,
             limit: int = 1 << 20) -> Optional[int]:
    """The smallest power-of-two GPU count whose model states and smallest activations fit."""
    gpus = 1
    while gpus <= limit:
        best = min((estimate_memory(cfg, lay, example, precision).total
                    for lay in candidate_layouts(cfg, gpus, gpus) if lay.activation_checkpointing), default=None)
        if best is not None and best <= gpu_memory_gb * GB * (1 - RESERVED_FRACTION):
            return gpus
        gpus *= 2
    return None


def _why_infeasible(cfg: ModelConfig, plan: Plan, smallest: tuple[Layout, Memory], precision: Precision) -> str:
    layout, memory = smallest
    states = memory.weights + memory.grads + memory.optimizer
    ex = Example(plan.seq_len, plan.targets_len, plan.tokens_per_sequence)
    needed = min_gpus(cfg, plan.gpu_memory_gb, ex, precision)
    more = f"; it needs at least {needed} GPUs of {plan.gpu_memory_gb:g} GB" if needed else ""
    return (f"{cfg.name} does not fit on {plan.gpus} x {plan.gpu_memory_gb:g} GB GPUs: the smallest layout "
            f"(ZeRO-{layout.zero_stage}, expert parallel {layout.ep_size}, micro batch {layout.micro_batch_size}, "
            f"activation checkpointing {'on' if layout.activation_checkpointing else 'off'}) needs "
            f"{memory.total / GB:.1f} GB per GPU, of which model states (weights, gradients, optimizer) are "
            f"{states / GB:.1f} GB, over the {plan.budget_bytes / GB:.1f} GB budget "
            f"({plan.gpu_memory_gb:g} GB less {RESERVED_FRACTION:.0%} reserve){more}")
