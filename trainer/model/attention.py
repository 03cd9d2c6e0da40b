"""Multi-head attention: causal (dense or GPT-3's locally banded), bidirectional, or cross-attention
over an encoder's output, optionally with an additive position bias (T5's relative buckets); and the
key-value cache that decoding one token at a time reads and extends.

Every kind goes through `F.scaled_dot_product_attention`, so PyTorch picks the fused kernel
for the device. Dense causal layers pass `is_causal=True` (no mask tensor at all); banded layers
attend block by block (trainer/model/local_attention.py: O(T * window), no (T, T) mask); decoding
after cached keys passes a boolean band mask over the new queries; a position bias is passed as the
float mask, causal masking already folded in.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.model.local_attention import banded_attention


@functools.lru_cache(maxsize=16)
def banded_causal_mask(seq_len: int, window: Optional[int], device: torch.device, past: int = 0) -> torch.Tensor:
    """(T, past + T) bool mask, True where query i, at position past + i, may attend key j:
    past + i - window < j <= past + i (window None: no lower bound, for decoding after `past` cached keys).

    Each query sees itself and the `window - 1` tokens before it. Cached because every banded
    layer of every step asks for the same mask; callers must not modify it.
    """
    offset = (past + torch.arange(seq_len, device=device))[:, None] - torch.arange(past + seq_len, device=device)
    return (offset >= 0) & (offset < (window or past + seq_len))


class LayerCache:
    """One attention layer's keys and values so far, each (B, n_head, L, head_dim): self-attention appends
    every call's; cross-attention projects the encoder's output into it once."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """What decoding keeps between steps: every decoder layer's self-attention (and cross-attention) cache,
    and an encoder-decoder's encoder output. len() is the number of tokens decoded so far."""

    def __init__(self, n_layer: int, cross: bool = False):
        self.self_attn = [LayerCache() for _ in range(n_layer)]
        self.cross_attn = [LayerCache() for _ in range(n_layer)] if cross else []
        self.memory: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.self_attn[0])


class Attention(nn.Module):
    """Self-attention (causal or bidirectional; `window` makes causal attention locally banded) or, with
    `fused_qkv=False` and a `memory` passed to forward, cross-attention whose keys and values come from it.

    fused_qkv: one projection to queries, keys and values (GPT-2's c_attn); otherwise a query projection
    (q_attn) and a key-value projection (c_attn), so cross-attention and T5's per-projection init fit.
    """

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, window: Optional[int] = None,
                 fused_qkv: bool = True):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.inner = cfg.n_head * cfg.head_dim
        self.causal = causal
        self.window = window
        self.dropout = cfg.dropout
        self.scale = None if cfg.attention_scaling else 1.0  # None: SDPA's 1/sqrt(head_dim)
        # Module names match Hugging Face GPT-2 (its cross-attention too) so its mapping is a transpose, not a rename.
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.c_attn = nn.Linear(cfg.d_model, 3 * self.inner, bias=cfg.bias)
        else:
            self.q_attn = nn.Linear(cfg.d_model, self.inner, bias=cfg.bias)
            self.c_attn = nn.Linear(cfg.d_model, 2 * self.inner, bias=cfg.bias)
        self.c_proj = nn.Linear(self.inner, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, cache: Optional[LayerCache] = None) -> torch.Tensor:
        """x (B, T, d); memory (B, S, d) for cross-attention; bias (1 or B, n_head, T, S), added to the
        scores, -inf where a query must not look (the caller folds causal masking in); cache when decoding:
        x's tokens follow the cached ones (S counts those too)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, memory, cache)
        y = self.attend(q, k, v, bias, causal=self.causal and memory is None and bias is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.inner))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
               causal: bool) -> torch.Tensor:
        """(B, n_head, T, head_dim) outputs of the queries over the keys (the last T of them are the queries')."""
        dropout_p = self.dropout if self.training else 0.0
        T, past = q.shape[2], k.shape[2] - q.shape[2]
        mask, is_causal = bias, causal
        if causal:
            # A band at least as long as the keys is plain causal attention: that keeps the fast path.
            band = self.window if self.window is not None and past + T > self.window else None
            if band and not past:
                return banded_attention(q, k, v, band, dropout_p=dropout_p, scale=self.scale)
            if T == 1 and band is None:  # one query that sees every key
                is_causal = False
            elif past or band:
                mask, is_causal = banded_causal_mask(T, band, q.device, past), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=self.scale)

    def project(self, x: torch.Tensor, memory: Optional[torch.Tensor],
                cache: Optional[LayerCache]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries of x and the keys and values attended to, each (B, n_head, L, head_dim): x's after the
        cached ones (self-attention), or memory's, projected on a cache's first call only (cross-attention)."""
        if self.fused_qkv:
            q, k, v = self.c_attn(x).split(self.inner, dim=2)
        else:
            q = self.q_attn(x)
            if memory is not None and cache is not None and len(cache):
                return self.heads(q), cache.k, cache.v
            k, v = self.c_attn(x if memory is None else memory).split(self.inner, dim=2)
        q, k, v = self.heads(q), self.heads(k), self.heads(v)
        if cache is not None:
            k, v = cache.extend(k, v)
        return q, k, v

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, n_head * head_dim) -> (B, n_head, L, head_dim)."""
        return t.view(t.shape[0], t.shape[1], self.n_head, self.head_dim).transpose(1, 2)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset (Mesh TensorFlow's `_relative_position_bucket`).

    Half the buckets (per direction when bidirectional) are exact offsets, the rest grow
    logarithmically up to max_distance; farther offsets share the last bucket. A causal stack only
    ever sees offsets <= 0, so it spends all buckets on the past.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), shared by every layer of a stack: the (1, n_head, T, S)
    bias that stack's self-attention adds to its scores (T5)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.table = nn.Embedding(cfg.relative_buckets, cfg.n_head)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """Queries at positions q_offset.., keys at 0..k_len - 1 (decoding puts the queries after the cache)."""
        device = self.table.weight.device
        queries = q_offset + torch.arange(q_len, device=device)
        relative = torch.arange(k_len, device=device)[None, :] - queries[:, None]
        bucket = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.table(bucket).permute(2, 0, 1).unsqueeze(0)
