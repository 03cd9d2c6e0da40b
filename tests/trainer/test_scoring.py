"""Continuation log-likelihoods in batches: equal to scoring one token at a time, greedy exactly when the
model's own greedy decoding gives the continuation, at any batch size; contexts cut from the left."""
from __future__ import annotations

import random

import pytest
import torch

from trainer.config import ModelConfig
from trainer.errors import TrainError
from trainer.model import GPT, EncoderDecoder
from trainer.scoring import continuation_logprobs

GPT_CFG = dict(arch="decoder", n_layer=2, n_head=2, d_model=32, vocab_size=64, n_ctx=16, attention="dense")
T5_CFG = dict(arch="encoder_decoder", n_layer=2, n_encoder_layer=2, n_head=2, d_model=32, d_kv=8, d_ff=48,
              vocab_size=64, n_ctx=32, pos_embedding="relative", norm="rmsnorm", bias=False, attention_scaling=False,
              activation="relu", scale_decoder_output=True, init="t5", decoder_start_token_id=62)
EOS = 63


def model(cfg: dict):
    torch.manual_seed(0)
    return (GPT if cfg["arch"] == "decoder" else EncoderDecoder)(ModelConfig(**cfg)).eval()


@torch.no_grad()
def greedy(gpt, context: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(gpt(torch.tensor([context + out])).logits[0, -1].argmax()))
    return out


@torch.no_grad()
def token_by_token(gpt, context: list[int], continuation: list[int]) -> float:
    seq, total = context + continuation, 0.0
    for j in range(len(context), len(seq)):
        total += torch.log_softmax(gpt(torch.tensor([seq[:j]])).logits[0, -1], -1)[seq[j]].item()
    return total


def requests(gpt, n: int) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1-11 tokens; continuations of 1-4 tokens: the model's greedy ones, every third with its
    last token changed."""
    rng, out = random.Random(0), []
    for i in range(n):
        context = [rng.randrange(63) for _ in range(rng.randint(1, 11))]
        continuation = greedy(gpt, context, rng.randint(1, 4))
        if i % 3 == 0:
            continuation[-1] = (continuation[-1] + 1) % 64
        out.append((context, continuation))
    return out


def test_decoder_scores_equal_token_by_token_at_any_batch_size():
    gpt = model(GPT_CFG)
    reqs = requests(gpt, 12)
    expected = [token_by_token(gpt, c, t) for c, t in reqs]
    for batch_size in (1, 5, 12):
        got = continuation_logprobs(gpt, reqs, batch_size, EOS)
        assert [g for _, g in got] == [i % 3 != 0 for i in range(12)]
        assert [lp for lp, _ in got] == pytest.approx(expected, rel=1e-5)


def test_a_long_context_keeps_its_last_tokens():
    """context + continuation over n_ctx + 1 tokens: the context is cut from the left to fit."""
    gpt = model(GPT_CFG)
    context, continuation = list(range(40)), [3, 4, 5]
    (got, _), = continuation_logprobs(gpt, [(context, continuation)], 1, EOS)
    assert got == pytest.approx(token_by_token(gpt, context[-(17 - 3):], continuation), rel=1e-5)
    with pytest.raises(TrainError, match="17 tokens does not fit the model's n_ctx=16"):
        continuation_logprobs(gpt, [([1], list(range(17)))], 1, EOS)


def test_encoder_decoder_scores_are_the_loss_of_the_continuation_as_targets():
    """The context and EOS to the encoder; batches mix continuations of any length but contexts of one length."""
    t5 = model(T5_CFG)
    reqs = [([5, 6, 7], [8, 9]), ([5, 6, 8], [1]), ([2], [3, 4, 5, 6]), ([5, 6, 7, EOS], [8, 9])]
    for batch_size in (1, 4):
        got = continuation_logprobs(t5, reqs, batch_size, EOS)
        for (context, continuation), (logprob, _) in zip(reqs, got):
            inputs = torch.tensor([context if context[-1] == EOS else context + [EOS]])
            with torch.no_grad():
                ce = t5(inputs, torch.tensor([continuation])).ce_loss.item()
            assert logprob == pytest.approx(-ce * len(continuation), rel=1e-5)
    assert got[0][0] == pytest.approx(got[3][0])  # a context already ending in EOS gets no second one
