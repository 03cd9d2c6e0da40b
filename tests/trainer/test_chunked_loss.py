"""Chunked cross-entropy (trainer/model/loss.py) against F.cross_entropy over the full logits, the path it
replaces: the same loss and gradients, ignored targets, chunks that do not divide the tokens, MoE losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from trainer.config import ModelConfig, MoEConfig
from trainer.model import GPT, EncoderDecoder
from trainer.model.loss import LMHead


def full_logits_loss(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def loss_and_grads(loss_fn, head, hidden):
    hidden = hidden.detach().requires_grad_()
    head.weight.grad = None
    loss = loss_fn(hidden)
    (2.5 * loss).backward()  # a scale, as loss scaling or accumulation applies
    return loss.detach(), hidden.grad, head.weight.grad


@pytest.mark.parametrize("tokens,chunk,ignored", [(37, 8, 0.3), (16, 1024, 0.0), (24, 6, 0.5), (10, 3, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_and_gradients_match_full_logits(tokens, chunk, ignored, dtype):
    torch.manual_seed(tokens)
    head = LMHead(24, 97, chunk).to(dtype)
    hidden = torch.randn(2, tokens, 24, dtype=dtype)
    targets = torch.randint(0, 97, (2, tokens))
    targets[torch.rand(2, tokens) < ignored] = -1
    ours = loss_and_grads(lambda h: head(h, targets), head, hidden)
    ref = loss_and_grads(lambda h: full_logits_loss(head, h, targets), head, hidden)
    if ignored == 1.0:  # no target at all: the mean is nan and nothing moves, as F.cross_entropy has it
        assert ours[0].isnan() and ref[0].isnan()
    else:
        torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-6)
    # bf16 gradients round once per chunk's weight-gradient partial sum instead of once overall.
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(ours[1], ref[1], **tol)
    torch.testing.assert_close(ours[2], ref[2], **tol)


def model_grads(model, idx, targets):
    model.zero_grad()
    out = model(idx, targets=targets)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.25)])
def test_gpt_training_step_matches_the_full_logits_path(moe):
    base = dict(n_layer=2, n_head=2, d_model=16, n_ctx=32, vocab_size=61, attention="alternating",
                local_window=8, moe=moe)
    torch.manual_seed(0)
    chunked = GPT(ModelConfig(**base, loss_chunk_tokens=7))
    full = GPT(ModelConfig(**base, loss_chunk_tokens=0))
    full.load_state_dict(chunked.state_dict())
    idx = torch.randint(0, 61, (3, 32))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    targets[0, :5] = -1
    ours, ours_grads = model_grads(chunked, idx, targets)
    ref, ref_grads = model_grads(full, idx, targets)
    assert ours.logits is None and ref.logits is not None  # the chunked path never built them
    for name in ("loss", "ce_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-6, rtol=1e-6)
    assert ours_grads.keys() == ref_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_encoder_decoder_loss_is_chunked_too():
    base = dict(arch="encoder_decoder", n_layer=2, n_head=2, d_model=16, n_ctx=32, vocab_size=61,
                pos_embedding="relative", norm="rmsnorm", activation="relu", init="t5", bias=False,
                tie_embeddings=True, scale_decoder_output=True)
    torch.manual_seed(0)
    chunked = EncoderDecoder(ModelConfig(**base, loss_chunk_tokens=5))
    full = EncoderDecoder(ModelConfig(**base, loss_chunk_tokens=0))
    full.load_state_dict(chunked.state_dict())
    inputs, targets = torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 9))
    targets[1, 6:] = -1
    (a, a_grads), (b, b_grads) = (model_grads(m, inputs, targets) for m in (chunked, full))
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    for name, grad in a_grads.items():
        torch.testing.assert_close(grad, b_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_eval_without_gradients_still_returns_logits():
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, n_ctx=16, vocab_size=50))
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        out = model(idx, targets=idx)
    torch.testing.assert_close(out.ce_loss, F.cross_entropy(out.logits.flatten(0, 1), idx.flatten()))


def test_negative_chunk_is_refused_by_name():
    with pytest.raises(ValidationError, match="loss_chunk_tokens"):
        ModelConfig(n_layer=1, n_head=2, d_model=16, loss_chunk_tokens=-1)
