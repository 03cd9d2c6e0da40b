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


T5_SHAPE = dict(arch="encoder_decoder", pos_embedding="relative", norm="rmsnorm", bias=False, attention_scaling=False,
                activation="relu", scale_decoder_output=True, n_ctx=512)
ENCDEC_SMALL = dict(arch="encoder_decoder", n_layer=3, n_encoder_layer=2, n_head=2, d_model=16, n_ctx=32,
                    vocab_size=101)


@pytest.mark.parametrize("kw", [
    dict(pos_embedding="sinusoidal", norm_position="post", activation="relu", scale_embeddings=True),
    dict(T5_SHAPE, d_kv=12),
    dict(T5_SHAPE, activation="gated-gelu", tie_embeddings=False, scale_decoder_output=False),
    dict(T5_SHAPE, moe=MoEConfig(num_experts=4, router_bias=True)),
    dict(pos_embedding="sinusoidal", moe=MoEConfig(num_experts=3, every=1, expert_d_ff=40)),
], ids=["vaswani", "t5-v1.0", "t5-v1.1", "switch-t5", "switch-every-layer"])
def test_encoder_decoder_counts_equal_real_model(kw):
    from trainer.model import EncoderDecoder

    cfg = ModelConfig(**(ENCDEC_SMALL | kw))
    model = EncoderDecoder(cfg)
    counts = param_counts(cfg)
    expert_params = [p for m in model.modules() if isinstance(m, SwitchExperts) for p in m.parameters()]
    assert counts.total == model.num_params()
    assert counts.non_embedding == model.num_params(non_embedding=True)
    assert counts.expert == sum(p.numel() for p in expert_params)
    assert counts.active == counts.total - counts.expert + sum(p.numel() // p.shape[0] for p in expert_params)


# Published sizes: Vaswani et al. 2017 Table 3 (vocabulary 37000), Raffel et al. 2020 (vocabulary 32128),
# Fedus et al. 2021 Table 9 (printed in whole billions): (shape, published count, tolerance).
ENCDEC_PUBLISHED = {
    "transformer-base": (dict(n_layer=6, n_head=8, d_model=512, d_ff=2048, vocab_size=37000, pos_embedding="sinusoidal",
                              norm_position="post", activation="relu"), 65e6, 2.5e6),
    "transformer-big": (dict(n_layer=6, n_head=16, d_model=1024, d_ff=4096, vocab_size=37000,
                             pos_embedding="sinusoidal", norm_position="post", activation="relu"), 213e6, 2e6),
    "t5-small": (dict(T5_SHAPE, n_layer=6, n_head=8, d_model=512, d_kv=64, d_ff=2048, vocab_size=32128), 60e6, 1e6),
    "t5-base": (dict(T5_SHAPE, n_layer=12, n_head=12, d_model=768, d_kv=64, d_ff=3072, vocab_size=32128), 220e6, 3e6),
    "switch-base-128": (dict(T5_SHAPE, n_layer=12, n_head=12, d_model=768, d_kv=64, d_ff=3072, vocab_size=32128,
                             moe=MoEConfig(num_experts=128)), 7e9, 0.5e9),
    "switch-large-128": (dict(T5_SHAPE, n_layer=24, n_head=16, d_model=1024, d_kv=64, d_ff=4096, vocab_size=32128,
                              moe=MoEConfig(num_experts=128)), 26e9, 0.5e9),
    "switch-c-2048": (dict(T5_SHAPE, n_layer=15, n_head=32, d_model=2080, d_kv=64, d_ff=6144, vocab_size=32128,
                           moe=MoEConfig(num_experts=2048, every=1)), 1571e9, 0.5e9),
}


@pytest.mark.parametrize("name", list(ENCDEC_PUBLISHED))
def test_encoder_decoder_sizes_match_the_papers(name):
    shape, published, tolerance = ENCDEC_PUBLISHED[name]
    cfg = ModelConfig(**({"arch": "encoder_decoder"} | shape))
    assert param_counts(cfg).total == pytest.approx(published, abs=tolerance)


def test_encoder_decoder_flops_formula():
    """A token is one input and one target position: encoder blocks attend once, decoder blocks twice."""
    cfg = ModelConfig(**(ENCDEC_SMALL | dict(T5_SHAPE, n_ctx=32, d_kv=12)))
    n = param_counts(cfg).non_embedding + 101 * 16
    assert flops_per_token(cfg, seq_len=20) == 6 * n + 12 * (2 * 12) * (2 + 2 * 3) * 20
