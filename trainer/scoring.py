"""Log-likelihoods of continuations, batched on the model's device: what `pretrain eval`'s few-shot
tasks and the lm-evaluation-harness adapter (trainer/harness.py) ask of a model.

A request is (context ids, continuation ids); the answer is (sum of log p(continuation token | everything
before it), whether greedy decoding reproduces the continuation). Teacher forcing answers both in one
forward pass: greedy decoding reproduces the continuation exactly when each continuation token is the
argmax given the tokens before it.
- Decoder: context + continuation, truncated from the left to n_ctx + 1 tokens (lm-eval's rule), the last
  token dropped; rows right-padded in a batch (causal attention never lets a position see the padding).
- Encoder-decoder: the context, ending in EOS as the objective's inputs do, to the encoder (truncated from
  the left to n_ctx); the continuation as the decoder's targets. The encoder has no padding mask, so a
  batch holds contexts of one length.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.errors import TrainError

Request = tuple[list[int], list[int]]
Progress = Callable[[int], object]  # told how many requests each batch answered


def device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def batches(keys: list[int], batch_size: int, same_key: bool = False) -> list[list[int]]:
    """Indices into `keys` in batches of at most `batch_size`, largest key first (the least padding); with
    `same_key`, a batch never mixes keys."""
    order = sorted(range(len(keys)), key=lambda i: -keys[i])
    groups = [list(g) for _, g in itertools.groupby(order, key=keys.__getitem__)] if same_key else [order]
    return [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


def padded(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    x = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return x.to(device)


def score_rows(logits: torch.Tensor, ends: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
    """Row i's continuation is predicted by logits[i, ends[i] - len(cont) : ends[i]]."""
    out = []
    for row, end, cont in zip(logits, ends, continuations):
        logp = F.log_softmax(row[end - len(cont):end].float(), dim=-1)
        target = torch.tensor(cont, device=logp.device)
        out.append(torch.stack([logp.gather(1, target[:, None]).sum(), (logp.argmax(-1) == target).all().float()]))
    return [(lp, bool(greedy)) for lp, greedy in torch.stack(out).tolist()]


@torch.no_grad()
def decoder_logprobs(model, requests: list[Request], batch_size: int, n_ctx: int,
                     progress: Progress) -> list[tuple[float, bool]]:
    results: list = [None] * len(requests)
    for idx in batches([len(ctx) + len(cont) for ctx, cont in requests], batch_size):
        rows = [(requests[i][0] + requests[i][1])[-(n_ctx + 1):][:-1] for i in idx]
        logits = model(padded(rows, 0, device_of(model))).logits
        for i, answer in zip(idx, score_rows(logits, [len(r) for r in rows], [requests[i][1] for i in idx])):
            results[i] = answer
        progress(len(idx))
    return results


@torch.no_grad()
def encdec_logprobs(model, requests: list[Request], batch_size: int, n_ctx: int, eos: int,
                    progress: Progress) -> list[tuple[float, bool]]:
    inputs = [(ctx if ctx[-1:] == [eos] else ctx + [eos])[-n_ctx:] for ctx, _ in requests]
    targets = [cont[-n_ctx:] for _, cont in requests]
    results: list = [None] * len(requests)
    device = device_of(model)
    for idx in batches([len(x) for x in inputs], batch_size, same_key=True):
        conts = [targets[i] for i in idx]
        decoder_inputs = model.shift_right(padded(conts, -1, device))
        logits = model(padded([inputs[i] for i in idx], eos, device), decoder_inputs=decoder_inputs).logits
        for i, answer in zip(idx, score_rows(logits, [len(c) for c in conts], conts)):
            results[i] = answer
        progress(len(idx))
    return results


def continuation_logprobs(model, requests: list[Request], batch_size: int, eos: int,
                          progress: Progress = lambda n: None) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each request's continuation; see the module docstring."""
    if any(not ctx or not cont for ctx, cont in requests):
        raise ValueError("every request needs a non-empty context and continuation")
    n_ctx = model.cfg.n_ctx
    if model.cfg.arch == "encoder_decoder":
        return encdec_logprobs(model, requests, batch_size, n_ctx, eos, progress)
    if too_long := [len(cont) for _, cont in requests if len(cont) > n_ctx]:
        raise TrainError(f"a continuation of {max(too_long)} tokens does not fit the model's n_ctx={n_ctx}")
    return decoder_logprobs(model, requests, batch_size, n_ctx, progress)
