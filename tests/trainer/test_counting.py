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


# Published sizes of the shipped configs at the paper's vocabulary: Vaswani et al. 2017 Table 3 (shared BPE of
# 37000), Raffel et al. 2020 Table 14 and Fedus et al. 2021 Table 9 (SentencePiece, 32128): (vocabulary, the
# paper's figure, our exact count where it is more than 2% from the figure, with docs/training.md's reason).
ENCDEC_PUBLISHED = {
    "transformer-base": (37000, 65e6, 63_082_496),  # the architecture Table 3 describes has 63.1M at 37000 tokens
    "transformer-big": (37000, 213e6, None),
    "t5-small": (32128, 60e6, None),
    "t5-base": (32128, 220e6, None),
    "t5-large": (32128, 770e6, 737_668_096),  # the released t5-large (transformers counts the same)
    "switch-t5-base-128": (32128, 7e9, 7_415_217_408),  # Table 9 prints whole billions: 7.4B reads as 7B
    "switch-t5-large-128": (32128, 26e9, None),
    "switch-t5-c-2048": (32128, 1571e9, None),
}


def at_paper_vocab(name: str, vocab: int) -> ModelConfig:
    """The shipped YAML with the paper's vocabulary (and T5's start token 0, inside it)."""
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    return ModelConfig(**(data | dict(vocab_size=vocab, decoder_start_token_id=0)))


@pytest.mark.parametrize("name", list(ENCDEC_PUBLISHED))
def test_encoder_decoder_sizes_match_the_papers(name):
    vocab, published, exception = ENCDEC_PUBLISHED[name]
    total = param_counts(at_paper_vocab(name, vocab)).total
    if exception is None:
        assert total == pytest.approx(published, rel=0.02)
    else:  # a documented exception: the exact count, still honestly outside 2%
        assert total == exception and abs(total / published - 1) > 0.02


def test_switch_active_parameters_are_the_dense_models():
    """A Switch model's parameters per token are its T5's plus a router per Switch layer (Fedus et al.: equal FLOPs)."""
    for switch, dense in (("switch-t5-base-8", "t5-base"), ("switch-t5-base-128", "t5-base"),
                          ("switch-t5-large-128", "t5-large")):
        s, d = at_paper_vocab(switch, 32128), at_paper_vocab(dense, 32128)
        moe_layers = s.encoder_layers // 2 + s.n_layer // 2
        assert param_counts(s).active == param_counts(d).total + moe_layers * s.d_model * s.moe.num_experts


def test_training_example_lengths():
    from trainer.config import TrainConfig
    from trainer.model.counting import Example, training_example

    t5 = at_paper_vocab("t5-base", 32128)
    assert training_example(t5) == Example(512, 114, 568)  # T5's span corruption at n_ctx
    assert training_example(t5, 64) == Example(64, 14, 70)
    assert training_example(t5, train=TrainConfig(objective="causal_lm", seq_len=128)) == Example(128, 128, 128)
    assert training_example(ModelConfig(**SMALL), train=TrainConfig(seq_len=16)) == Example(16, 16, 16)


def test_encoder_decoder_flops_hand_count():
    """1 + 1 blocks, d 8, 2 heads of 4, FFN 16, no biases, RMS norms, vocabulary 10; 6 inputs, 3 targets, 7 raw."""
    from trainer.model.counting import Example, flops_per_example

    cfg = ModelConfig(**(ENCDEC_SMALL | T5_SHAPE | dict(n_layer=1, n_encoder_layer=1, d_model=8, d_kv=4, d_ff=16,
                                                       vocab_size=10)))
    attention, ffn, norm = 4 * 8 * 8, 2 * 8 * 16, 8
    per_input = attention + ffn + 2 * norm + norm + 2 * 8 * 8  # encoder block, its final norm, cross keys/values
    per_target = attention + 2 * 8 * 8 + ffn + 3 * norm + norm + 10 * 8  # self, cross q/o, FFN, norms, head
    pairs = 6 * 6 + 3 * 3 + 3 * 6  # encoder self, decoder self, decoder to inputs
    expected = 6 * (per_input * 6 + per_target * 3) + 12 * 8 * pairs
    assert flops_per_example(cfg, Example(6, 3, 7)) == expected


@pytest.mark.parametrize("kw", [dict(T5_SHAPE, d_kv=12), dict(pos_embedding="sinusoidal", norm_position="post",
                                                              activation="relu", scale_embeddings=True, bias=False)],
                         ids=["t5", "vaswani"])
def test_encoder_decoder_flops_equal_the_matmuls_of_a_training_step(kw):
    """torch's FLOP counter over a real forward and backward: every matmul, 6 per weight and position, and
    the attention's 12 per channel and query-key pair (norms, 6 per weight, are not matmuls)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.model import EncoderDecoder
    from trainer.model.counting import Example, _norm_params, flops_per_example

    cfg = ModelConfig(**(ENCDEC_SMALL | kw))
    model, (B, S, T) = EncoderDecoder(cfg), (2, 20, 7)
    inputs, targets = torch.randint(0, 100, (B, S)), torch.randint(0, 100, (B, T))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # the fused kernels go uncounted
        model(inputs, targets).loss.backward()
    final = 1 if cfg.norm_position == "pre" else 0
    norm_positions = (2 * cfg.encoder_layers + final) * S + (3 * cfg.n_layer + final) * T
    expected = flops_per_example(cfg, Example(S, T, 0)) - 6 * _norm_params(cfg) * norm_positions
    assert counter.get_total_flops() == B * expected


def test_mfu_counts_flops_per_raw_token():
    """The trainer's MFU multiplies tokens/s (raw tokens) by flops_for: one example's FLOPs over its raw tokens."""
    from cluster.configio import load_run_config
    from trainer.metrics import flops_for
    from trainer.model.counting import Example, flops_per_example

    run = load_run_config(CONFIGS.parent / "train" / "tiny-t5-cpu.yaml")
    assert run.train.tokens_per_sequence == 70
    assert flops_for(run) == flops_per_example(run.model, Example(64, 14, 70)) / 70
