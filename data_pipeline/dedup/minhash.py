"""MinHash signatures over word n-grams (5 by default), vectorised with numpy.

Words are hashed with a polynomial hash computed for all words at once from one cumulative
sum over the text's bytes (mod 2^64, where numpy's uint64 arithmetic wraps for free); n-gram
hashes combine n word hashes, go through the splitmix64 finalizer, and each of the
bands*rows hash functions is a multiply-shift permutation `(a*x + b) >> 32`. Everything is a
pure function of the text and the seed, so signatures match across processes and runs."""
from __future__ import annotations

import hashlib

import numpy as np

from data_pipeline.text import normalize_for_dedup

P = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
P_INV = np.uint64(pow(int(P), -1, 1 << 64))
Q = np.uint64(0x9E3779B97F4A7C15)
SHINGLE_CHUNK = 8192  # bounds the (shingles x hashes) temporary to a few MB
_powers = {"p": np.ones(1, np.uint64), "p_inv": np.ones(1, np.uint64)}


def _power_table(name: str, base: np.uint64, length: int) -> np.ndarray:
    table = _powers[name]
    if len(table) < length:
        size = max(length, 2 * len(table))
        table = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, base, np.uint64)]), dtype=np.uint64)
        _powers[name] = table
    return table[:length]


def splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(normalized: str) -> np.ndarray:
    """One uint64 per space-separated word of an already normalized text."""
    data = np.frombuffer(normalized.encode("utf-8"), np.uint8)
    if data.size == 0:
        return np.zeros(0, np.uint64)
    spaces = np.flatnonzero(data == 32)
    starts = np.concatenate([[0], spaces + 1])
    ends = np.concatenate([spaces, [data.size]])
    prefix = np.concatenate([[np.uint64(0)], np.cumsum(data * _power_table("p_inv", P_INV, data.size), dtype=np.uint64)])
    return (prefix[ends] - prefix[starts]) * _power_table("p", P, data.size)[ends - 1]


def shingle_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every n consecutive words (the whole text when shorter than n words)."""
    if words.size == 0:
        return np.zeros(1, np.uint64)
    count = max(1, words.size - n + 1)
    combined = np.zeros(count, np.uint64)
    for k in range(min(n, words.size)):
        combined = combined * Q + words[k:k + count]
    return splitmix64(combined)


class MinHasher:
    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        n_hashes = bands * rows
        self.a = rng.integers(1, 1 << 63, n_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, n_hashes, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """bands*rows uint32 minima; equal rows in a band put two documents in one bucket."""
        shingles = shingle_hashes(word_hashes(normalize_for_dedup(text)), self.ngram)
        minima = np.full(self.a.size, np.iinfo(np.uint32).max, np.uint32)
        for start in range(0, shingles.size, SHINGLE_CHUNK):
            chunk = shingles[start:start + SHINGLE_CHUNK, None]
            permuted = ((chunk * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
            np.minimum(minima, permuted.min(axis=0), out=minima)
        return minima


def exact_hash(text: str) -> np.uint64:
    digest = hashlib.blake2b(normalize_for_dedup(text).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))
