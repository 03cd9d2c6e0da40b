"""BERT's pre-training objective (Devlin et al. 2018, §3.1 and Appendix A): masked language modelling
(MLM) and next-sentence prediction (NSP), made from the same mixed stream of documents as the others.

A row is `[CLS] A [SEP] B [SEP]`, then PAD up to seq_len; token type 0 up to the first [SEP], 1 for B
and its [SEP], 0 for the padding. Example i is made from its window alone, and its seed:
- the window is the stream's next `seq_len - 3` raw tokens (taken), then as many tokens of the document
  after the one being read (read ahead, not taken: trainer.data.SourceStream.read_ahead). A long
  document's examples read the next one from as far in as they are, so their B's differ;
- A is the start of the longest stretch without EOT (one document's text) of the taken tokens, cut at a
  uniformly random point; EOT itself never reaches a row, [SEP] marks the boundaries;
- IsNext (NSP label 0): B is the rest of that stretch, A's continuation in its document;
- NotNext (label 1): B is the read-ahead document's text up to its end, cut to the room A leaves: another
  document than any the taken tokens touch (barring a one-document shard read at the end of one epoch
  and the start of the next).
Of examples 2k and 2k+1, one is IsNext and the other NotNext, which one drawn by a coin seeded by k:
half of every even count of examples, exactly. The NotNext B's come from the neighbouring document in
the shard order rather than from anywhere in the corpus as BERT's do; that keeps every example a
function of one window, hence the exact resume and layout invariance of trainer.data, and reads no data
twice from disk. Cost: an example takes seq_len - 3 tokens from the shards and uses A and B of them;
what it leaves (other documents of its window, and in NotNext examples the text after A) is not seen
again (docs/benchmarks.md: the share used).

MLM: 15% of A's and B's positions are predicted, rounded stochastically (exact in expectation; BERT
rounds to nearest, which biases short rows) and at least one; of those 80% become [MASK], 10% a random
text id (0 .. EOT-1) and 10% stay. Labels hold the original ids there and -1 elsewhere. The generator is
seeded by (run seed, the example's global index), so there is no RNG state to save.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

from trainer.special_tokens import CLS, EOT, MASK, PAD, SEP

if TYPE_CHECKING:
    import torch  # not imported at run time: trainer.config reads the lengths here and loads without torch

STREAM = zlib.crc32(b"masked-lm")  # keeps these generators apart from other seeded streams
PAIR_STREAM = zlib.crc32(b"masked-lm-pair")  # the NSP coin of each pair of examples
PREDICT_RATE = 0.15  # share of A's and B's positions predicted
MASK_RATE, RANDOM_RATE = 0.8, 0.1  # of the predicted: [MASK], a random id; the rest stay
SPECIAL_POSITIONS = 3  # [CLS] and two [SEP]
MIN_SEQ_LEN = SPECIAL_POSITIONS + 2  # room for one token of A and one of B
NOT_NEXT = 1  # NSP label of a random B (Hugging Face's next_sentence_label: 0 continues A)


def raw_tokens(seq_len: int) -> int:
    """Raw tokens an example takes from the stream: its positions but the special ones."""
    return seq_len - SPECIAL_POSITIONS


def longest_text(tokens: np.ndarray) -> np.ndarray:
    """The longest stretch of `tokens` without EOT (the first of equals): text of one document."""
    bounds = np.concatenate(([-1], np.flatnonzero(tokens == EOT), [len(tokens)]))
    i = int(np.argmax(np.diff(bounds)))
    return tokens[bounds[i] + 1:bounds[i + 1]]


def first_text(tokens: np.ndarray) -> np.ndarray:
    """`tokens` up to the first EOT."""
    ends = np.flatnonzero(tokens == EOT)
    return tokens[:ends[0]] if len(ends) else tokens


def mask_tokens(ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels): PREDICT_RATE of the `candidates` positions are predicted, 80% of them shown as
    [MASK], 10% as a random text id, 10% unchanged; labels -1 where nothing is predicted."""
    count = max(1, int(PREDICT_RATE * len(candidates) + rng.random())) if len(candidates) else 0
    chosen = candidates[rng.permutation(len(candidates))[:count]]
    labels = np.full_like(ids, -1)
    labels[chosen] = ids[chosen]
    inputs, u = ids.copy(), rng.random(count)
    inputs[chosen[u < MASK_RATE]] = MASK
    randomised = chosen[(u >= MASK_RATE) & (u < MASK_RATE + RANDOM_RATE)]
    inputs[randomised] = rng.integers(0, EOT, size=len(randomised))
    return inputs, labels


class MaskedLM:
    """The objective for the data loader and the training loop: each window becomes one row of
    3 * seq_len + 1 ids: input ids, token types, MLM labels, then the NSP label."""

    def __init__(self, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        self.window = self.read_ahead = raw_tokens(seq_len)
        self.tokens_per_sequence = self.window  # what an example takes from the shards

    def nsp_label(self, index: int) -> int:
        """IsNext (0) or NotNext (1): opposite labels for examples 2k and 2k+1, in an order drawn for k."""
        coin = np.random.default_rng([self.seed, PAIR_STREAM, index // 2]).random() < 0.5
        return int(coin) ^ index % 2

    def segments(self, window: np.ndarray, label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of one window."""
        text = longest_text(window[:self.window])
        cut = int(rng.integers(1, len(text))) if len(text) > 1 else len(text)
        b = first_text(window[self.window:])[:self.window - cut] if label == NOT_NEXT else text[cut:]
        return text[:cut], b

    def example(self, window: np.ndarray, index: int) -> np.ndarray:
        """The row for the window with global example index `index`."""
        rng = np.random.default_rng([self.seed, STREAM, index])
        label = self.nsp_label(index)
        a, b = self.segments(window, label, rng)
        ids = np.full(self.seq_len, PAD, dtype=np.int64)
        ids[:len(a) + len(b) + 3] = np.concatenate(([CLS], a, [SEP], b, [SEP]))
        types = np.zeros(self.seq_len, dtype=np.int64)
        types[len(a) + 2:len(a) + len(b) + 3] = 1
        text = np.concatenate((np.arange(1, len(a) + 1), np.arange(len(a) + 2, len(a) + len(b) + 2)))
        inputs, labels = mask_tokens(ids, text, rng)
        return np.concatenate((inputs, types, labels, [label]))

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input ids, token types, attention mask (False at PAD), NSP labels, MLM labels): the BERT call's
        arguments, the targets last."""
        S = self.seq_len
        ids, types, labels = (batch[:, i * S:(i + 1) * S].contiguous() for i in range(3))
        return ids, types, ids != PAD, batch[:, 3 * S].contiguous(), labels

    def predicted(self, targets: torch.Tensor) -> int:
        """MLM positions the loss counts."""
        return int((targets != -1).sum())
