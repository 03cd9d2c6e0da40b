"""Wraps our single-device model in a DeepSpeed engine: ZeRO 0-3, fp32/bf16/fp16, clipping,
GPT-3's AdamW, activation checkpointing, and expert parallelism for our own Switch layer.

DeepSpeed only knows MoE through its own `deepspeed.moe.layer.MoE` class. Our model stays free of
DeepSpeed (torchtitan style), so the engine does what that class would have done: shard the experts
and exchange tokens (trainer/expert_parallel.py), put expert parameters into their own optimizer
groups keyed by their `group_name`, and tell DeepSpeed it has MoE layers so ZeRO reduces those
groups' gradients over the expert-data-parallel group only.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.utils import clip_grad_norm_
from deepspeed.runtime.zero.partition_parameters import get_all_subclasses
from torch import nn

from trainer.config import RunConfig
from trainer.distributed import expert_parallel_group
from trainer.expert_parallel import apply_expert_parallel, is_expert
from trainer.initialize import initialize
from trainer.model.experts import SwitchExperts
from trainer.model.moe import SwitchFFN
from trainer.zero_memory import zero_settings


def ds_config(cfg: RunConfig, world: int, accum: int) -> dict:
    t, precision = cfg.train, cfg.train.precision
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero_optimization(cfg),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our AdamW is torch's; DeepSpeed's fused Adam would need a JIT build on every fresh machine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }


def zero_optimization(cfg: RunConfig) -> dict:
    """ZeRO's section (cluster/plan.py counts its buffers), with ZeRO++'s secondary weight partition when asked."""
    section = zero_settings(cfg.model, cfg.parallel.zero_stage)
    if cfg.parallel.zero_hpz_partition_size > 1:
        section["zero_hpz_partition_size"] = cfg.parallel.zero_hpz_partition_size
    return section


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """GPT-3 decays matrices only: not biases, norms or embeddings (the tied head is the embedding).
    Expert parameters are then split into their own groups, one per expert-parallel size."""
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Embedding, nn.LayerNorm)) or p.ndim < 2 or name.startswith("b_"):
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    groups_ = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay, "name": "decay"},
               {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0, "name": "no_decay"}]
    groups_ = [g for g in groups_ if g["params"]]
    if any(is_expert(p) for p in params):
        groups_ = split_params_into_different_moe_groups_for_optimizer(groups_)
    return groups_


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that refuses a non-finite gradient (leaves parameters and moments untouched) and says so
    through `overflow`, the attribute DeepSpeed's engine reads to count a skipped step. ZeRO's own
    wrappers detect overflow themselves for fp16/fp32; this covers ZeRO-0 and bf16."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self.overflow:
            return None
        return super().step(closure)


class Engine(DeepSpeedEngine):
    """DeepSpeedEngine that also recognises our Switch layers (expert parameters marked by apply_expert_parallel)."""

    def _configure_distributed_model(self, model):
        if any(is_expert(p) for p in model.parameters()):
            self.has_moe_layers = True
            self.num_experts = [m.cfg.num_experts for m in model.modules() if isinstance(m, SwitchFFN)]
        super()._configure_distributed_model(model)

    def clip_fp32_gradients(self):
        # DeepSpeed drops this norm under ZeRO-0 fp32; keep it so every stage reports grad_norm.
        self._global_grad_norm = clip_grad_norm_(parameters=self.module.parameters(),
                                                 max_norm=self.gradient_clipping(), mpu=self.mpu)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward: memory for compute, no change to the model file."""
    for block in model.blocks():
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
        for m in block.modules():
            if isinstance(m, SwitchExperts):
                m.recompute = True


def build_model(cfg: RunConfig, world: int, accum: int) -> nn.Module:
    """The model as this rank holds it, with layout-invariant initial weights (trainer/initialize.py).
    No rank allocates more than its share: under ZeRO-3 each parameter is partitioned as it is created
    (deepspeed.zero.Init); otherwise the model is built on the meta device, the experts are sharded
    (expert parallelism), and only then is memory allocated."""
    from trainer.model import model_for

    device = get_accelerator().current_device_name()
    if cfg.parallel.zero_stage == 3:
        with PartitionAtCreation(config_dict_or_path=ds_config(cfg, world, accum)), skip_default_init():
            model = model_for(cfg.model)
        undo_skip_init_hooks()
    else:
        with torch.device("meta"):
            model = model_for(cfg.model)
        if cfg.model.moe is not None:
            apply_expert_parallel(model, cfg.parallel.ep_size, expert_parallel_group(cfg.parallel.ep_size))
        materialize(model, device)
    model.init_buffers()
    initialize(model, cfg.train.seed)
    return model


class PartitionAtCreation(deepspeed.zero.Init):
    """deepspeed.zero.Init without its broadcast of every whole parameter from rank 0, which writes the
    whole tensor on every other rank before partitioning it: trainer.initialize writes each rank's
    partition from the seed instead, the same on every rank by construction."""

    def _zero_init_param(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()


def undo_skip_init_hooks() -> None:
    """zero.Init wraps every Module class's `_apply` when a module is created on the meta device (the tied
    token embedding is) and unwraps them only when that module's `to_empty` runs, which ours never does:
    the wrappers would then partition any model built later in this process."""
    for cls in [nn.Module, *get_all_subclasses(nn.Module)]:
        if "_old_apply_of_skip_init_hook" in cls.__dict__:
            apply = cls.__dict__["_apply"]
            while hasattr(apply, "__wrapped__"):
                apply = apply.__wrapped__
            cls._apply = apply
            del cls._old_apply_of_skip_init_hook


def apply_compile(model: nn.Module) -> None:
    """Regional torch.compile: each block is compiled on its own, so one compiled graph serves every layer
    and the model file stays eager. Module.compile keeps parameter names (checkpoints, exports unchanged)."""
    for block in model.blocks():
        if not any(isinstance(m, SwitchFFN) for m in block.modules()):
            block.compile()
            continue
        for child in block.children():  # routing's data-dependent shapes stay eager
            if not any(isinstance(m, SwitchFFN) for m in child.modules()) and any(True for _ in child.parameters()):
                child.compile()


@contextlib.contextmanager
def skip_default_init() -> Iterator[None]:
    """torch.nn.init does nothing inside: a layer's default init would write every page of its whole
    weight before ZeRO-3 partitions it, and trainer.initialize overwrites the values anyway."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def materialize(model: nn.Module, device: str) -> None:
    """Allocates a model built on the meta device, keeping tied parameters tied (tensors are swapped in
    place) and the attributes set on parameters (expert markers)."""
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for name, p in model.named_parameters():
        vars(p).update(attributes[name])


def build_engine(cfg: RunConfig, model: nn.Module, world: int, accum: int) -> Engine:
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    t = cfg.train
    # torch's fused AdamW: several times faster than the per-tensor loop on CPU, the same update.
    fused = get_accelerator().device_name() in ("cpu", "cuda")
    optimizer = SkippingAdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                              fused=fused)
    config = ds_config(cfg, world, accum)
    return Engine(args=None, model=model, optimizer=optimizer, config=config,
                  config_class=DeepSpeedConfig(config, None))
