"""Span corruption (Raffel et al. 2020, T5 §3.1.4; the Switch Transformer's pre-training objective).

An example is a window of `window` raw tokens cut from the same mixed stream as the causal LM's
(documents with EOT between them, so a window may straddle documents, as T5's concatenated
chunks do). A noise mask marks round(window * noise_density) of its tokens, in
round(noise / mean_noise_span_length) spans, alternating with as many non-noise spans and starting with
non-noise (T5's `random_spans_noise_mask`: every such mask equally likely; numpy draws them, so the
distribution is T5's but not the mask for a given seed). Then
- inputs: the non-noise tokens, the i-th noise span replaced by <extra_id_i>, then EOS;
- targets: for each noise span in order, <extra_id_i> and the span's tokens, then EOS.
EOS is GPT-2's end-of-text (50256), appended as T5 appends its </s>; the EOTs inside a window are
ordinary tokens that may be corrupted. Sentinel and PAD ids: `trainer.special_tokens`.

The raw window and the target length follow from the input length as T5's `random_spans_helper`
computes them, so nothing needs padding at T5's settings: inputs 512 -> 568 raw tokens -> targets 114
(both lengths include the EOS). Where the rounding leaves a row short, it is filled with PAD.

Each example's mask comes from a generator seeded by (run seed, the example's global index), as the
shard order in trainer.data is, so the examples depend on neither the layout of ranks and loader
workers nor a resume: there is no RNG state to save.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Optional

import numpy as np

from trainer.special_tokens import EOT, NUM_SENTINELS, PAD, SENTINEL_0

if TYPE_CHECKING:
    import torch  # not imported at run time: trainer.config reads the lengths here and loads without torch

STREAM = zlib.crc32(b"span-corruption")  # keeps the mask generators apart from other seeded streams


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in `length` raw tokens; Python's round, half to even, as T5's."""
    noise = int(round(length * noise_density))
    return noise, int(round(noise / mean_noise_span_length))


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, of `length` raw tokens after corruption."""
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    return length - noise + spans + 1, noise + spans + 1


def random_spans_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """T5's `random_spans_helper`: (raw tokens per example, targets length) for encoder inputs of
    `inputs_length`: the most raw tokens whose corrupted inputs fit, and their targets."""
    tokens = inputs_length - 1
    while corrupted_lengths(tokens + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens += 1
    inputs, targets = corrupted_lengths(tokens, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets > inputs:  # T5's: targets as long as the (likely round) inputs
        tokens, targets = tokens - 1, targets - 1
    return tokens, targets


def settings_problem(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> Optional[str]:
    """Why these settings cannot corrupt every example the same way, or None."""
    window, _ = random_spans_lengths(inputs_length, noise_density, mean_noise_span_length)
    noise, spans = span_counts(window, noise_density, mean_noise_span_length)
    if spans > NUM_SENTINELS:
        return (f"{window} raw tokens per example make {spans} noise spans, more than the {NUM_SENTINELS} "
                f"sentinels: shorten train.seq_len or lengthen train.span_corruption.mean_noise_span_length")
    if not 1 <= spans <= min(noise, window - noise):
        return (f"{window} raw tokens per example make {noise} noise tokens in {spans} spans: need at least "
                f"one span, and no more spans than noise or non-noise tokens")
    return None


def _segment_lengths(rng: np.random.Generator, items: int, segments: int) -> np.ndarray:
    """A uniformly random split of `items` into `segments` non-empty runs (T5's `_random_segmentation`)."""
    cuts = np.sort(rng.permutation(items - 1)[:segments - 1]) + 1  # faster than choice(replace=False)
    return np.diff(np.concatenate(([0], cuts, [items])))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of `length`: noise spans alternating with non-noise spans, non-noise first, the
    lengths of each kind a uniformly random split of its count (T5's `random_spans_noise_mask`)."""
    noise, _ = span_counts(length, noise_density, mean_noise_span_length)
    noise = min(max(noise, 1), length - 1)  # T5's guard: some noise and some non-noise in short sequences
    spans = max(int(round(noise / mean_noise_span_length)), 1)
    lengths = np.empty(2 * spans, dtype=np.int64)
    lengths[0::2] = _segment_lengths(rng, length - noise, spans)
    lengths[1::2] = _segment_lengths(rng, noise, spans)
    return np.repeat(np.arange(2 * spans) % 2 == 1, lengths)


def spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each run of masked tokens becomes one sentinel, <extra_id_0> for the first run, then 1, 2, ...
    (T5's `noise_span_to_unique_sentinel`, with our ids counting up)."""
    previous = np.concatenate(([False], mask[:-1]))
    first = mask & ~previous
    return np.where(first, SENTINEL_0 - 1 + np.cumsum(first), tokens)[~(mask & previous)]


class SpanCorruption:
    """The objective for the data loader and the training loop: each window of `window` raw tokens
    becomes one row of `inputs_length + targets_length` ids, the encoder inputs then the targets."""

    def __init__(self, inputs_length: int, noise_density: float, mean_noise_span_length: float, seed: int):
        self.inputs_length, self.seed = inputs_length, seed
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.window, self.targets_length = random_spans_lengths(inputs_length, noise_density, mean_noise_span_length)
        self.tokens_per_sequence = self.window  # what an example consumes from the shards

    def example(self, tokens: np.ndarray, index: int) -> np.ndarray:
        """The row for the window with global example index `index`."""
        rng = np.random.default_rng([self.seed, STREAM, index])
        mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, rng)
        row = np.full(self.inputs_length + self.targets_length, PAD, dtype=np.int64)
        inputs, targets = spans_to_sentinels(tokens, mask), spans_to_sentinels(tokens, ~mask)
        for start, ids in ((0, inputs), (self.inputs_length, targets)):
            row[start:start + len(ids)] = ids
            row[start + len(ids)] = EOT
        return row

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder inputs, targets): the model shifts the targets right behind PAD itself. A PAD target
        becomes -1, which the loss skips (and the decoder reads as PAD)."""
        targets = batch[:, self.inputs_length:]
        return batch[:, :self.inputs_length].contiguous(), targets.masked_fill(targets == PAD, -1)

    def predicted(self, targets: torch.Tensor) -> int:
        """Target positions the loss counts."""
        return int((targets != -1).sum())
