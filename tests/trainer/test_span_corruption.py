"""Span corruption (T5 §3.1.4) in the data path: T5's lengths, noise statistics over 10,000 examples of
the real loader over real shards, every raw token exactly once across inputs and targets with the
sentinels in order, the config's checks, and eval's held-out batches. Layout invariance and exact
resume are the loader tests in test_data.py, run for both objectives."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import GPT2_VOCAB_SIZE, RunConfig, TrainConfig
from trainer.configio import validate
from trainer.data import CausalLM, MixedStream, TrainLoader, heldout_batches, load_manifest, objective_for
from trainer.errors import ConfigError, TrainError
from trainer.eval import heldout_loss
from trainer.span_corruption import SpanCorruption, corrupted_lengths, random_spans_lengths, span_counts
from trainer.special_tokens import EOT, NAMES, NUM_SENTINELS, PAD, SENTINEL_0, SPAN_CORRUPTION_VOCAB_SIZE

T5 = dict(noise_density=0.15, mean_noise_span_length=3.0)


def uncorrupt(row: np.ndarray, inputs_length: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(raw tokens, noise mask, sentinel numbers in the inputs, in the targets) rebuilt from one row:
    inputs are nonnoise_0 S0 nonnoise_1 S1 ... EOS PAD..., targets S0 noise_0 S1 noise_1 ... EOS PAD..."""
    runs, sentinels = [], []
    for ids in (row[:inputs_length], row[inputs_length:]):
        n = int(np.count_nonzero(ids != PAD))
        assert (ids[n:] == PAD).all() and ids[n - 1] == EOT  # EOS, then padding only
        body = ids[:n - 1]
        starts = np.flatnonzero(body >= SENTINEL_0)
        sentinels.append((body[starts] - SENTINEL_0).tolist())
        pieces = np.split(body, starts)
        runs.append([pieces[0]] + [p[1:] for p in pieces[1:]])
    (nonnoise, tail), (head, noise) = (runs[0][:-1], runs[0][-1]), (runs[1][0], runs[1][1:])
    assert len(tail) == 0 and len(head) == 0  # spans alternate, non-noise first, noise last
    pairs = [(a, b) for a, b in zip(nonnoise, noise, strict=True)]
    raw = np.concatenate([t for pair in pairs for t in pair])
    mask = np.concatenate([np.repeat([False, True], [len(a), len(b)]) for a, b in pairs])
    return raw, mask, sentinels[0], sentinels[1]


def test_special_tokens_are_appended_after_gpt2():
    assert PAD == GPT2_VOCAB_SIZE == 50257 and EOT == 50256
    assert (SENTINEL_0, SENTINEL_0 + NUM_SENTINELS - 1, SPAN_CORRUPTION_VOCAB_SIZE) == (50258, 50357, 50358)
    assert NAMES[50257] == "<pad>" and NAMES[50258] == "<extra_id_0>" and NAMES[50357] == "<extra_id_99>"
    assert len(NAMES) == 104  # and BERT's three (test_masked_lm.py)


def test_lengths_follow_t5s_random_spans_helper():
    assert random_spans_lengths(512, 0.15, 3.0) == (568, 114)  # T5's inputs 512 -> 568 raw -> targets 114
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114) and span_counts(568, 0.15, 3.0) == (85, 28)
    assert corrupted_lengths(569, 0.15, 3.0)[0] == 513  # 568 is the most that fits
    assert random_spans_lengths(256, 0.5, 3.0) == (382, 256)
    assert random_spans_lengths(512, 0.5, 8.0) == (908, 512)
    t = TrainConfig(objective="span_corruption", seq_len=512)
    assert t.tokens_per_sequence == 568 and SpanCorruption(512, **T5, seed=0).targets_length == 114
    assert TrainConfig(seq_len=512).tokens_per_sequence == 512  # the causal LM counts what it predicts


@pytest.mark.parametrize("inputs_length,density,mean", [(512, 0.15, 3.0), (256, 0.5, 3.0), (512, 0.5, 8.0),
                                                        (11, 0.5, 3.0), (100, 0.3, 2.0), (64, 0.05, 1.0)])
def test_rows_have_fixed_lengths_and_every_token_once(inputs_length, density, mean):
    """Inputs exactly inputs_length and targets exactly T5's targets length (PAD where T5's rounding
    leaves a row short: (11, 0.5, 3.0)); the non-sentinel tokens of inputs and targets interleave back
    to the window, each once, in order; the sentinels count up from <extra_id_0> in both."""
    objective = SpanCorruption(inputs_length, density, mean, seed=3)
    noise, spans = span_counts(objective.window, density, mean)
    rng = np.random.default_rng(0)
    for index in range(200):
        window = rng.integers(0, EOT + 1, size=objective.window)
        row = objective.example(window, index)
        assert row.dtype == np.int64 and row.shape == (inputs_length + objective.targets_length,)
        raw, mask, in_sentinels, out_sentinels = uncorrupt(row, inputs_length)
        assert np.array_equal(raw, window) and mask.sum() == noise
        assert in_sentinels == out_sentinels == list(range(spans))
    padded = np.count_nonzero(row == PAD)
    assert padded == (2 if (inputs_length, density) == (11, 0.5) else 0)


@pytest.mark.slow
def test_noise_statistics_over_ten_thousand_examples_of_the_loader(shard_dir):
    """The real loader over real shards: 10,000 examples of T5's settings, each the next raw window of
    the mixed stream, corrupted at density 0.15 in spans of mean length 3 (within 2%), in spans whose
    lengths vary."""
    data = load_manifest(shard_dir, SPAN_CORRUPTION_VOCAB_SIZE)
    objective = SpanCorruption(512, **T5, seed=7)
    loader = TrainLoader(data, objective, 100, 0, 1, 7, 2.0, "error", 0)
    stream = MixedStream(data, objective, 7, heldout_percent=2.0)
    noise_at = np.zeros(objective.window)
    spans, lengths = 0, []
    for _ in range(100):
        for row in loader.next().numpy():
            raw, mask, in_sentinels, out_sentinels = uncorrupt(row, 512)
            assert np.array_equal(raw, stream.next_window()) and in_sentinels == out_sentinels
            edges = np.diff(mask.astype(int))
            lengths += (np.append(np.flatnonzero(edges == -1), len(mask) - 1) - np.flatnonzero(edges == 1)).tolist()
            noise_at += mask
            spans += len(in_sentinels)
    density = noise_at.sum() / (10_000 * objective.window)
    mean_span = noise_at.sum() / spans
    assert abs(density / 0.15 - 1) < 0.02 and abs(mean_span / 3.0 - 1) < 0.02, (density, mean_span)
    # T5's masks start with non-noise and end with noise; in between no stretch is favoured.
    assert noise_at[0] == 0 and noise_at[-1] == 10_000
    blocks = noise_at[50:-50].reshape(9, 52).mean(axis=1) / 10_000
    assert blocks.max() / blocks.min() < 1.05, blocks
    assert math.isclose(np.mean(lengths), mean_span) and min(lengths) == 1 and max(lengths) >= 10
    assert sum(loader.tokens_by_source().values()) == 10_000 * 568  # raw tokens taken from the shards


def test_same_seed_same_bytes_and_another_seed_other_masks(shard_dir):
    data = load_manifest(shard_dir, SPAN_CORRUPTION_VOCAB_SIZE)

    def batches(seed):
        loader = TrainLoader(data, SpanCorruption(64, **T5, seed=seed), 8, 0, 1, 1, 2.0, "error", 0)
        return [loader.next().numpy().tobytes() for _ in range(5)]

    first, again, other = batches(1), batches(1), batches(2)
    assert first == again
    assert all(a != b for a, b in zip(first, other))


def test_config_checks_name_the_key(tmp_path):
    run = {"model": {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 512}, "data": {"path": str(tmp_path)},
           "train": {"objective": "span_corruption", "seq_len": 512}}
    with pytest.raises(ConfigError, match=r"run.yaml: train.objective: span_corruption does not train a model.arch "
                                          r"decoder \(a decoder trains with causal_lm"):
        validate(RunConfig, run, "run.yaml")
    run["model"].update(arch="encoder_decoder", pos_embedding="relative")
    with pytest.raises(ConfigError, match=r"run.yaml: model.vocab_size: 50257 has no room .* at least 50358"):
        validate(RunConfig, run, "run.yaml")
    run["model"]["vocab_size"] = SPAN_CORRUPTION_VOCAB_SIZE
    assert validate(RunConfig, run, "run.yaml").train.tokens_per_sequence == 568
    run["train"].update(seq_len=2048)
    run["model"]["n_ctx"] = 2048
    with pytest.raises(ConfigError, match=r"run.yaml: train.span_corruption: 2274 raw tokens .* 114 noise spans, "
                                          r"more than the 100 sentinels"):
        validate(RunConfig, run, "run.yaml")
    run["train"]["span_corruption"] = {"mean_noise_span_length": 0.5}
    with pytest.raises(ConfigError, match="train.span_corruption.mean_noise_span_length"):
        validate(RunConfig, run, "run.yaml")


def test_objective_refuses_a_tokenizer_that_overlaps_the_special_ids(shard_dir):
    data = load_manifest(shard_dir, SPAN_CORRUPTION_VOCAB_SIZE)
    t = TrainConfig(objective="span_corruption", seq_len=512)
    assert objective_for(t, data).window == 568
    data.tokenizer = {**data.tokenizer, "name": "bigger", "vocab_size": 50300}
    with pytest.raises(TrainError, match="data.path: tokenizer 'bigger' has 50300 ids; span corruption appends"):
        objective_for(t, data)


def test_heldout_batches_are_the_heldout_windows_corrupted_deterministically(shard_dir):
    """`pretrain eval` of a span-corruption run: the held-out stream the causal LM would read, cut into
    568-token windows, corrupted the same way every time."""
    data = load_manifest(shard_dir, SPAN_CORRUPTION_VOCAB_SIZE)
    objective = SpanCorruption(512, **T5, seed=5)
    batches = heldout_batches(data, objective, 2, heldout_percent=10.0, max_batches=3)
    assert len(batches) == 3 and all(b.shape == (2, 512 + 114) for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, heldout_batches(data, objective, 2, 10.0, 3)))
    windows = heldout_batches(data, CausalLM(567), 2, heldout_percent=10.0, max_batches=3)
    for b, w in zip(batches, windows):
        for row, window in zip(b.numpy(), w.numpy()):
            assert np.array_equal(uncorrupt(row, 512)[0], window)


class UniformModel(torch.nn.Module):
    """The encoder-decoder interface, model(inputs, targets), predicting every id of the vocabulary equally."""

    def forward(self, inputs, targets):
        logits = torch.zeros(*targets.shape, SPAN_CORRUPTION_VOCAB_SIZE)
        return SimpleNamespace(ce_loss=F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1))  # as lm_output: split() marks PAD targets -1


@pytest.mark.parametrize("inputs_length,density,predicted", [(512, 0.15, 114), (11, 0.5, 10)])
def test_heldout_loss_counts_the_targets_but_not_their_padding(shard_dir, inputs_length, density, predicted):
    data = load_manifest(shard_dir, SPAN_CORRUPTION_VOCAB_SIZE)
    objective = SpanCorruption(inputs_length, density, 3.0, seed=5)
    batches = heldout_batches(data, objective, 2, heldout_percent=10.0, max_batches=3)
    result = heldout_loss(UniformModel(), batches, objective)
    assert result["heldout_tokens"] == 3 * 2 * predicted
    assert math.isclose(result["heldout_perplexity"], SPAN_CORRUPTION_VOCAB_SIZE, rel_tol=1e-4)
