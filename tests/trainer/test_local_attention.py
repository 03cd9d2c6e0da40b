"""Blocked banded attention (trainer/model/local_attention.py) against the masked reference it replaces:
SDPA over the whole (T, T) band mask (attention.banded_causal_mask), outputs and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.model import GPT
from trainer.model.attention import banded_causal_mask
from trainer.model.local_attention import banded_attention


def masked_reference(q, k, v, window, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=banded_causal_mask(q.shape[2], window, q.device),
                                          scale=scale)


# (batch, heads, T, window): T < window, T == window, T a multiple, T one past and one short of a multiple.
SHAPES = [(2, 3, 5, 8), (1, 2, 8, 8), (2, 2, 32, 8), (1, 4, 33, 8), (3, 1, 39, 8), (2, 2, 64, 1), (1, 2, 50, 7)]


@pytest.mark.parametrize("batch,heads,seq,window", SHAPES)
@pytest.mark.parametrize("scale", [None, 1.0])
def test_outputs_and_gradients_match_the_masked_band(batch, heads, seq, window, scale):
    torch.manual_seed(seq * window)
    q, k, v = (torch.randn(batch, heads, seq, 16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(batch, heads, seq, 16)
    ours = banded_attention(q, k, v, window, scale=scale)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    ref = masked_reference(q, k, v, window, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_query_sees_itself_and_the_window_minus_one_before_it():
    """Each value carries its position: the band's mean over positions i - window + 1 .. i, as the mask says."""
    seq, window = 11, 4
    q = k = torch.zeros(1, 1, seq, 1)  # equal scores: the output is the mean of the visible values
    v = torch.arange(seq, dtype=torch.float32).view(1, 1, seq, 1)
    out = banded_attention(q, k, v, window).flatten()
    expected = [sum(range(max(0, i - window + 1), i + 1)) / min(i + 1, window) for i in range(seq)]
    assert out.tolist() == pytest.approx(expected)


def test_gpt_alternating_never_builds_the_full_band_mask():
    """A training-length forward of GPT-3's pattern no longer asks for the (T, T) mask; decoding still does."""
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, n_ctx=64, vocab_size=50, attention="alternating",
                      local_window=8)
    model = GPT(cfg).eval()
    banded_causal_mask.cache_clear()
    idx = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        full = model(idx).logits
        assert banded_causal_mask.cache_info().currsize == 0
        cache = model.new_cache()
        model(idx[:, :30], cache=cache)
        step = model(idx[:, 30:31], cache=cache).logits
    torch.testing.assert_close(step[:, 0], full[:, 30], atol=1e-5, rtol=1e-5)
