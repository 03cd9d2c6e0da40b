"""The parallelism planner: a layout (ZeRO stage, expert-parallel size, micro batch, gradient
accumulation, activation checkpointing) that fits N GPUs of M GB, with the memory per GPU and
the step time it implies, or a clear reason why nothing fits.

Every GPU is a data-parallel rank (the engine has ZeRO and expert parallelism, no tensor or
pipeline parallelism). Model states come from `trainer.zero_memory.memory_per_gpu`; this
module adds what a training step holds besides them, following the model code in
trainer/model/: the tensors autograd saves per block, the cross-entropy buffers over the
vocabulary, MoE dispatch buffers, and DeepSpeed's communication buffers.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from trainer.config import ModelConfig
from trainer.model.counting import flops_per_token, param_counts
from trainer.zero_memory import DEEPSPEED_BUCKET_ELEMENTS, comm_bucket_elements, memory_per_gpu, zero3_layer_elements

INIT_CHUNK = 1 << 20  # trainer.initialize.CHUNK, not imported here: that would load torch for every plan

Precision = Literal["bf16", "fp16", "fp32"]
GB = 1e9
# Kept free on every GPU for the CUDA context, allocator fragmentation and NCCL: plans fill 90%.
RESERVED_FRACTION = 0.10
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

    @property
    def step(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.moe_all_to_all + self.buffers

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
    seq_len: int
    global_batch_size: int
    precision: str
    assumed_mfu: float
    gpu_tflops: float
    budget_bytes: float
    layout: Optional[Layout] = None
    memory: Optional[Memory] = None
    flops_per_step: float = 0.0
    step_time_s: float = 0.0
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
                f"train.activation_checkpointing={str(lay.activation_checkpointing).lower()}"]

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


def block_element_bytes(cfg: ModelConfig, layer: int, tokens: int, precision: Precision) -> float:
    """Bytes autograd saves for one block's backward (trainer/model/gpt.py, attention.py, moe.py).

    Attention: LN input and output, q/k/v, the fused-attention output and its contiguous copy for
    the projection: 7 x (tokens x d). The second LN's input and output: 2. Dense FFN: GELU input
    and output: 2 x (tokens x d_ff). A Switch FFN instead keeps the routed [experts, capacity, d]
    buffer, the expert hidden pre/post GELU and the gathered output; its router works in float32.
    """
    d, a = cfg.d_model, _element_bytes(precision)
    if not cfg.is_moe_layer(layer):
        return a * tokens * (9 * d + 2 * cfg.ff_width)
    routed = cfg.moe.capacity_factor * tokens
    router_fp32 = 4 * tokens * (2 * cfg.moe.num_experts + (d if a != 4 else 0))
    return a * (tokens * 10 * d + routed * (d + 2 * cfg.expert_ff_width)) + router_fp32


def logits_bytes(cfg: ModelConfig, tokens: int, precision: Precision) -> float:
    """Peak of the loss over the vocabulary: the logits, and in float32 the log-softmax output,
    the gradient arriving from the NLL loss and the gradient it produces (alive together)."""
    return tokens * cfg.vocab_size * (_element_bytes(precision) + 12)


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: Precision, checkpointing: bool) -> float:
    tokens = micro_batch * seq_len
    a = _element_bytes(precision)
    per_block = [block_element_bytes(cfg, i, tokens, precision) for i in range(cfg.n_layer)]
    # Checkpointed blocks keep only their input, then recompute one block at a time in backward.
    blocks = cfg.n_layer * a * tokens * cfg.d_model + max(per_block) if checkpointing else sum(per_block)
    banded_mask = seq_len * seq_len if cfg.attention == "alternating" and seq_len > cfg.local_window else 0
    final_norm = 2 * a * tokens * cfg.d_model  # ln_f input and output
    return blocks + banded_mask + final_norm + logits_bytes(cfg, tokens, precision)


def estimate_memory(cfg: ModelConfig, layout: Layout, seq_len: int, precision: Precision) -> Memory:
    states = memory_per_gpu(cfg, layout.zero_stage, layout.dp_size, layout.ep_size, precision)
    tokens = layout.micro_batch_size * seq_len
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
    return Memory(weights=states.weights, grads=states.grads, optimizer=states.optimizer,
                  activations=activation_bytes(cfg, layout.micro_batch_size, seq_len, precision,
                                               layout.activation_checkpointing),
                  moe_all_to_all=all_to_all, buffers=buffers, construction=construction,
                  checkpoint_save=checkpoint_save)


def largest_param(cfg: ModelConfig, ep_size: int) -> int:
    """Elements of a rank's largest parameter: the (tied) token embedding, or a layer's stacked local experts."""
    experts = cfg.moe.num_experts // ep_size * cfg.d_model * cfg.expert_ff_width if cfg.moe is not None else 0
    return max(cfg.vocab_size * cfg.d_model, experts, cfg.d_model * cfg.ff_width)


def step_time_s(cfg: ModelConfig, seq_len: int, global_batch: int, gpus: int, mfu: float, tflops: float,
                checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs per step, seconds): model FLOPs over gpus x peak x MFU; recomputing the forward
    pass under activation checkpointing costs another third of the work at the same utilisation."""
    flops = flops_per_token(cfg, seq_len) * seq_len * global_batch
    return flops, flops / (gpus * tflops * 1e12 * mfu) * (4 / 3 if checkpointing else 1)


def default_global_batch(cfg: ModelConfig, seq_len: int) -> int:
    total = param_counts(cfg).total
    tokens = next(t for limit, t in GPT3_BATCH_TOKENS if total < limit)
    return max(1, round(tokens / seq_len))


def expert_parallel_sizes(cfg: ModelConfig, gpus: int) -> list[int]:
    """The sizes the trainer accepts for this model on `gpus` data-parallel ranks."""
    if cfg.moe is None:
        return [1]
    return [e for e in range(1, cfg.moe.num_experts + 1) if cfg.expert_parallel_error(e, gpus) is None]


def candidate_layouts(cfg: ModelConfig, gpus: int, global_batch: int):
    """Cheapest first: no recompute before recompute, lower ZeRO stages (less communication),
    fewer expert-parallel ranks (less all-to-all), larger micro batches (fewer, fuller steps)."""
    per_rank = global_batch // gpus
    micro_batches = sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True)
    # The trainer refuses ZeRO-3 with experts (RunConfig.for_world).
    stages = [0, 1, 2] if cfg.moe is not None else [0, 1, 2, 3]
    for ckpt, stage, ep, micro in itertools.product((False, True), stages, expert_parallel_sizes(cfg, gpus),
                                                    micro_batches):
        yield Layout(stage, ep, gpus, micro, per_rank // micro, ckpt)


def _rounded_batch(global_batch: int, gpus: int) -> int:
    """The nearest multiple of the data-parallel size (at least one sequence per GPU)."""
    return max(gpus, round(global_batch / gpus) * gpus)


def make_plan(cfg: ModelConfig, gpus: int, gpu_memory_gb: float, *, seq_len: Optional[int] = None,
              global_batch: Optional[int] = None, precision: Precision = "bf16", mfu: float = 0.4,
              gpu_tflops: float = 312.0) -> Plan:
    seq_len = seq_len or cfg.n_ctx
    wanted = global_batch or default_global_batch(cfg, seq_len)
    batch = _rounded_batch(wanted, gpus)
    plan = Plan(feasible=False, model=cfg.name, gpus=gpus, gpu_memory_gb=gpu_memory_gb, seq_len=seq_len,
                global_batch_size=batch, precision=precision, assumed_mfu=mfu, gpu_tflops=gpu_tflops,
                budget_bytes=gpu_memory_gb * GB * (1 - RESERVED_FRACTION))
    if batch != wanted:
        plan.notes.append(f"global batch {wanted} -> {batch} sequences: a multiple of the {gpus} data-parallel ranks")
    smallest: Optional[tuple[Layout, Memory]] = None
    for layout in candidate_layouts(cfg, gpus, batch):
        memory = estimate_memory(cfg, layout, seq_len, precision)
        if smallest is None or memory.total < smallest[1].total:
            smallest = (layout, memory)
        if memory.total <= plan.budget_bytes:
            plan.feasible, plan.layout, plan.memory = True, layout, memory
            plan.flops_per_step, plan.step_time_s = step_time_s(
                cfg, seq_len, batch, gpus, mfu, gpu_tflops, layout.activation_checkpointing)
            plan.tokens_per_s = batch * seq_len / plan.step_time_s
            plan.reason = _why_not_cheaper(cfg, layout, seq_len, precision, plan.budget_bytes)
            return plan
    plan.layout, plan.memory = smallest
    plan.reason = _why_infeasible(cfg, plan, smallest, precision)
    return plan


def _why_not_cheaper(cfg: ModelConfig, chosen: Layout, seq_len: int, precision: Precision, budget: float) -> str:
    """Why the cheaper settings were passed over, from their own estimates at micro batch 1."""
    reasons = []
    if chosen.zero_stage > 0:
        lower = Layout(chosen.zero_stage - 1, chosen.ep_size, chosen.dp_size, 1, 1, True)
        need = estimate_memory(cfg, lower, seq_len, precision).total
        reasons.append(f"ZeRO-{lower.zero_stage} would need {need / GB:.1f} GB per GPU even with micro batch 1 "
                       f"and activation checkpointing")
    smaller_ep = [e for e in expert_parallel_sizes(cfg, chosen.dp_size) if e < chosen.ep_size]
    if smaller_ep:
        fewer = Layout(chosen.zero_stage, smaller_ep[-1], chosen.dp_size, 1, 1, chosen.activation_checkpointing)
        need = estimate_memory(cfg, fewer, seq_len, precision).total
        reasons.append(f"expert parallel {fewer.ep_size} would need {need / GB:.1f} GB with micro batch 1")
    if chosen.activation_checkpointing:
        plain = Layout(chosen.zero_stage, chosen.ep_size, chosen.dp_size, 1, 1, False)
        need = estimate_memory(cfg, plain, seq_len, precision).total
        reasons.append(f"without activation checkpointing micro batch 1 would need {need / GB:.1f} GB")
    budget_text = f"the {budget / GB:.1f} GB budget"
    return "; ".join(reasons) + f" (over {budget_text})" if reasons else f"the cheapest layout fits {budget_text}"


def min_gpus(cfg: ModelConfig, gpu_memory_gb: float, seq_len: int, precision: Precision, limit: int = 1 << 20) -> Optional[int]:
    """The smallest power-of-two GPU count whose model states and smallest activations fit."""
    gpus = 1
    while gpus <= limit:
        best = min((estimate_memory(cfg, lay, seq_len, precision).total
                    for lay in candidate_layouts(cfg, gpus, gpus) if lay.activation_checkpointing), default=None)
        if best is not None and best <= gpu_memory_gb * GB * (1 - RESERVED_FRACTION):
            return gpus
        gpus *= 2
    return None


def _why_infeasible(cfg: ModelConfig, plan: Plan, smallest: tuple[Layout, Memory], precision: Precision) -> str:
    layout, memory = smallest
    states = memory.weights + memory.grads + memory.optimizer
    needed = min_gpus(cfg, plan.gpu_memory_gb, plan.seq_len, precision)
    more = f"; it needs at least {needed} GPUs of {plan.gpu_memory_gb:g} GB" if needed else ""
    return (f"{cfg.name} does not fit on {plan.gpus} x {plan.gpu_memory_gb:g} GB GPUs: the smallest layout "
            f"(ZeRO-{layout.zero_stage}, expert parallel {layout.ep_size}, micro batch {layout.micro_batch_size}, "
            f"activation checkpointing {'on' if layout.activation_checkpointing else 'off'}) needs "
            f"{memory.total / GB:.1f} GB per GPU, of which model states (weights, gradients, optimizer) are "
            f"{states / GB:.1f} GB, over the {plan.budget_bytes / GB:.1f} GB budget "
            f"({plan.gpu_memory_gb:g} GB less {RESERVED_FRACTION:.0%} reserve){more}")
