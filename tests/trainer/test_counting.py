"""Analytic parameter counts and FLOPs: exact against real models, close to the GPT-3 paper."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import ModelConfig, MoEConfig
from trainer.model import GPT
from trainer.model.counting import flops_per_token, param_counts
from trainer.model.experts import SwitchExperts

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

# Brown et al. 2020, Table 2.1: (n_layer, d_model, n_head, paper's parameter count). 13B uses
# d_model 5120 (the table's 5140 is not divisible by its 40 heads).
GPT3 = {
    "125m": (12, 768, 12, 125e6), "350m": (24, 1024, 16, 350e6), "760m": (24, 1536, 16, 760e6),
    "1.3b": (24, 2048, 16, 1.3e9), "2.7b": (32, 2560, 32, 2.7e9), "6.7b": (32, 4096, 32, 6.7e9),
    "13b": (40, 5120, 40, 13e9), "175b": (96, 12288, 96, 175e9),
}

SMALL = dict(n_layer=4, n_head=2, d_model=16, n_ctx=32, vocab_size=101)


@pytest.mark.parametrize("kw", [
    dict(), dict(attention="alternating", local_window=8), dict(pos_embedding="sinusoidal"), dict(bias=False),
    dict(d_ff=24, moe=MoEConfig(num_experts=4)),
    dict(bias=False, moe=MoEConfig(num_experts=3, every=1, expert_d_ff=40)),
], ids=["dense", "alternating", "sinusoidal", "no-bias", "switch", "switch-every-layer"])
def test_counts_equal_real_model(kw):
    cfg = ModelConfig(**SMALL, **kw)
    model = GPT(cfg)
    counts = param_counts(cfg)
    expert_params = [p for m in model.modules() if isinstance(m, SwitchExperts) for p in m.parameters()]
    expert = sum(p.numel() for p in expert_params)
    assert counts.total == model.num_params()
    assert counts.non_embedding == model.num_params(non_embedding=True)
    assert counts.embedding == counts.total - counts.non_embedding
    assert counts.expert == expert
    # Expert weights are stacked [E, ...]: one expert per MoE layer is numel / E of each.
    one_expert_per_layer = sum(p.numel() // p.shape[0] for p in expert_params)
    assert counts.active == counts.total - expert + one_expert_per_layer


@pytest.mark.parametrize("size", list(GPT3))
def test_gpt3_sizes_within_two_percent_of_paper(size):
    n_layer, d_model, n_head, paper = GPT3[size]
    cfg = ModelConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, n_ctx=2048, vocab_size=50257)
    assert param_counts(cfg).total == pytest.approx(paper, rel=0.02)
    path = CONFIGS / f"gpt3-{size}.yaml"
    if path.exists():  # the shipped config describes the same model
        shipped = ModelConfig(**yaml.safe_load(path.read_text()))
        assert param_counts(shipped).total == pytest.approx(paper, rel=0.02)


def test_switch_c_counts_instantly():
    cfg = ModelConfig(n_layer=15, n_head=32, d_model=2080, d_ff=6144, moe=MoEConfig(num_experts=2048, every=1))
    counts = param_counts(cfg)
    experts = 15 * 2048 * (2 * 2080 * 6144 + 6144 + 2080)
    assert counts.expert == experts
    assert counts.active == counts.total - experts + experts // 2048


def test_flops_formula():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, n_ctx=64, vocab_size=100)
    counts = param_counts(cfg)
    n = counts.non_embedding + 100 * 16
    assert flops_per_token(cfg) == 6 * n + 12 * 2 * 16 * 64
    assert flops_per_token(cfg, seq_len=32) == 6 * n + 12 * 2 * 16 * 32
    banded = cfg.model_copy(update=dict(attention="alternating", local_window=8))
    assert flops_per_token(banded) == 6 * n + 12 * 16 * (64 + 8)
    gpt3 = ModelConfig(n_layer=96, d_model=12288, n_head=96)
    assert flops_per_token(gpt3) == pytest.approx(6 * 175e9, rel=0.05)
