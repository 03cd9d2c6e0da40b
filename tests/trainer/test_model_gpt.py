"""GPT model: Hugging Face GPT-2 equivalence, causality, banded attention, init and loss at init."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ModelConfig
from trainer.model import GPT
from trainer.model.attention import banded_causal_mask
from trainer.model.hf import hf_config, load_hf_state_dict, to_hf_state_dict


def small_cfg(**kw) -> ModelConfig:
    base = dict(n_layer=3, n_head=4, d_model=32, n_ctx=64, vocab_size=97)
    return ModelConfig(**{**base, **kw})


def hf_model(cfg: ModelConfig, seed: int = 0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(cfg)).eval()
    with torch.no_grad():  # non-zero biases and norms, so a mixed-up mapping cannot hide behind zeros
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_hf_weights_give_same_logits():
    cfg = small_cfg()
    hf = hf_model(cfg)
    ours = GPT(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (ours(idx).logits - hf(idx).logits).abs().max().item()
    assert diff < 1e-4


def test_our_weights_load_into_hf():
    from transformers import GPT2LMHeadModel

    cfg = small_cfg()
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf = GPT2LMHeadModel(hf_config(cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (ours(idx).logits - hf(idx).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("kw", [dict(attention="alternating"), dict(pos_embedding="sinusoidal"),
                                dict(bias=False), dict(moe=dict(num_experts=2))])
def test_hf_mapping_refuses_non_gpt2_models(kw):
    cfg = small_cfg(**kw)
    with pytest.raises(ValueError, match="Hugging Face"):
        hf_config(cfg)
    with pytest.raises(ValueError, match="Hugging Face"):
        to_hf_state_dict(GPT(cfg))


@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_future_tokens_do_not_change_logits(attention):
    cfg = small_cfg(attention=attention, local_window=8)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_banded_mask_shape():
    mask = banded_causal_mask(6, 3, torch.device("cpu"))
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert banded_causal_mask(6, 3, torch.device("cpu")) is mask  # built once


def attention_output(cfg: ModelConfig, layer: int, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    attn = GPT(cfg).transformer.h[layer].attn.eval()
    with torch.no_grad():
        return attn(x)


@pytest.mark.parametrize("attention,reaches", [("alternating", False), ("dense", True)])
def test_token_beyond_band_is_invisible_to_banded_layer(attention, reaches):
    cfg = small_cfg(n_layer=2, attention=attention, local_window=4)
    x = torch.randn(1, 16, cfg.d_model)
    changed = x.clone()
    changed[0, 3] += 1.0  # token 3 is 5 positions before token 8: outside a band of 4
    a, b = attention_output(cfg, 1, x), attention_output(cfg, 1, changed)
    assert torch.allclose(a[0, 7:], b[0, 7:]) != reaches
    assert not torch.allclose(a[0, 3:7], b[0, 3:7])  # inside the band it does matter


def test_residual_projections_are_scaled():
    cfg = small_cfg(n_layer=8, d_model=128, n_head=4)
    model = GPT(cfg)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loss_at_init_is_log_vocab():
    cfg = small_cfg(vocab_size=1000)
    model = GPT(cfg).eval()
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 4, 64))  # independent targets: nothing to learn
    with torch.no_grad():
        out = model(idx, targets=targets)
    assert out.loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.02)
    assert out.aux_loss.item() == 0.0 and out.moe == []


def test_sequence_longer_than_position_table_is_refused():
    cfg = small_cfg(n_ctx=16)
    with pytest.raises(ValueError, match="n_ctx"):
        GPT(cfg)(torch.zeros(1, 17, dtype=torch.long))
