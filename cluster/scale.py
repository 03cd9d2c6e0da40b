"""Scaling a config down to a target machine while keeping its family: the architecture (decoder or
encoder-decoder, with its norms, activation, positions and embedding options), the attention pattern
(dense or alternating dense/banded, with the band the same fraction of the context), biases, the FFN
width ratio, the training objective, and for Switch models the MoE frequency, routing (capacity
factors, jitter) and losses. Only sizes change: depth (both stacks), width, heads, context, number of
experts, batch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.configio import CONFIGS_DIR, is_train_yaml, load_config, load_run_config
from trainer.config import ModelConfig, RunConfig
from trainer.configio import read_yaml

Target = Literal["cpu", "single-gpu"]


@dataclass(frozen=True)
class TargetSize:
    min_layers: int
    d_model: int
    head_dim: int
    n_ctx: int
    max_experts: int
    train: dict[str, Any]  # the train section: sizes that run in minutes on the target


TARGETS: dict[str, TargetSize] = {
    # The shipped tiny CPU configs' sizes: seconds per step on 2 cores.
    "cpu": TargetSize(min_layers=2, d_model=64, head_dim=32, n_ctx=256, max_experts=4, train=dict(
        seq_len=64, max_steps=300, micro_batch_size=8, global_batch_size=8, lr=3e-3,
        warmup_tokens=10_240, decay_tokens=153_600, precision="fp32")),
    # About 50M parameters: a few minutes for a few thousand steps on one modern GPU.
    "single-gpu": TargetSize(min_layers=8, d_model=512, head_dim=64, n_ctx=1024, max_experts=8, train=dict(
        seq_len=1024, max_steps=2000, micro_batch_size=16, global_batch_size=32, lr=6e-4,
        warmup_tokens=3_276_800, decay_tokens=65_536_000, precision="bf16")),
}


def _layers(cfg: ModelConfig, minimum: float) -> int:
    """At least `minimum`, and a whole number of the pattern's period so every kind of block appears
    (dense and banded attention; dense and MoE FFN), in the same proportions as the original."""
    period = math.lcm(2 if cfg.attention == "alternating" else 1, cfg.moe.every if cfg.moe else 1)
    return period * math.ceil(max(minimum, period) / period)


def _width(ratio: float, d_model: int) -> int:
    return max(8, round(ratio * d_model / 8) * 8)


def scale_model(cfg: ModelConfig, target: Target) -> ModelConfig:
    size = TARGETS[target]
    data = cfg.model_dump()
    data.update(name=f"{cfg.name}-{target}", n_layer=_layers(cfg, size.min_layers), d_model=size.d_model,
                n_head=size.d_model // size.head_dim, d_ff=_width(cfg.ff_width / cfg.d_model, size.d_model),
                n_ctx=size.n_ctx)
    if cfg.n_encoder_layer is not None:  # the encoder keeps its depth relative to the decoder
        data["n_encoder_layer"] = _layers(cfg, size.min_layers * cfg.n_encoder_layer / cfg.n_layer)
    if cfg.d_kv is not None:  # heads of the target's width (Switch-C's 32 x 64 inside 2080 has no small form)
        data["d_kv"] = size.head_dim
    # The band keeps its share of the context, and stays shorter than the training sequence.
    share = cfg.local_window / cfg.n_ctx
    data["local_window"] = max(4, min(round(share * size.n_ctx), size.train["seq_len"] // 2))
    if cfg.moe is not None:
        moe = data["moe"]
        moe["num_experts"] = min(cfg.moe.num_experts, size.max_experts)
        if cfg.moe.expert_d_ff:
            moe["expert_d_ff"] = _width(cfg.moe.expert_d_ff / cfg.d_model, size.d_model)
        if isinstance(cfg.moe.routing_group, int):  # N tokens sized for the original batch need not divide the target's
            moe["routing_group"] = "sequence"
    return ModelConfig.model_validate(data)


def _base_run(model: ModelConfig) -> dict[str, Any]:
    """For a bare model YAML: the shipped tiny CPU recipe of the same kind (data path, objective, logging...)."""
    kind = {"decoder": "tiny-switch" if model.moe else "tiny-gpt", "encoder": "tiny-bert",
            "encoder_decoder": "tiny-switch-t5" if model.moe else "tiny-t5"}[model.arch]
    name = f"{kind}-cpu.yaml"
    return read_yaml(CONFIGS_DIR / "train" / name)


def scale_config(path: str | Path, target: Target, overrides: list[str] = ()) -> RunConfig:
    """A whole run config: the scaled model, the target's train sizes, single-process parallelism."""
    if is_train_yaml(read_yaml(path)):
        job = load_run_config(path, overrides)
        model, run = job.model, job.model_dump(mode="json", exclude={"cluster"})
    else:
        model = load_config(path, ModelConfig, overrides)
        run = _base_run(model)
    scaled = scale_model(model, target)
    run["model"] = scaled.model_dump(mode="json", exclude_none=True)
    # Token-denominated schedules shrink with the batch: the target's warmup and decay, no batch
    # ramp (GPT-3's ramp starts above a whole CPU batch); no recompute at sizes that fit anyway.
    run["train"] = {**run.get("train", {}), **TARGETS[target].train,
                    "batch_rampup_tokens": 0, "activation_checkpointing": False}
    run["parallel"] = {"zero_stage": 0, "ep_size": 1}
    return RunConfig.model_validate(run)


def to_yaml(run: RunConfig, source: str | Path, target: Target) -> str:
    header = f"# {run.model.name}: `pretrain scale {source} --target {target}` (same family, {target} size)\n"
    return header + yaml.safe_dump(run.model_dump(mode="json", exclude_none=True), sort_keys=False)
