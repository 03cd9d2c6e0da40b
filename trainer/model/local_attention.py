"""GPT-3's locally banded causal attention in O(T * window) work, without a (T, T) mask.

Query i sees keys j with i - window < j <= i (itself and the window - 1 tokens before it). Queries
go in blocks of `window`: block b's keys all lie in key blocks b - 1 and b, so each block attends
to that pair of 2 * window keys under one shared (window, 2 * window) mask. Block 0 has no
predecessor and is plain causal attention over its own keys. Both calls are 4-D
`F.scaled_dot_product_attention`, so the device's fused kernels still run.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F


def pair_mask(window: int, device: torch.device) -> torch.Tensor:
    """(window, 2 * window) bool: True where query i of a block may see key c of [previous block, own block].
    Key c sits window - c positions before the block's start, so i - window < c - window <= i."""
    i = torch.arange(window, device=device)[:, None]
    c = torch.arange(2 * window, device=device)[None, :]
    return (c > i) & (c <= i + window)


cached_pair_mask = functools.lru_cache(maxsize=16)(pair_mask)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float = 0.0,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of q over k, v (each (B, H, T, D)) limited to the last `window` keys; (B, H, T, D)."""
    B, H, T, D = q.shape
    blocks = -(-T // window)
    pad = blocks * window - T
    if pad:  # padded keys lie after every real query, so no real query sees them; padded queries are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb, kb, vb = (t.unflatten(2, (blocks, window)) for t in (q, k, v))  # (B, H, blocks, window, D)
    first = F.scaled_dot_product_attention(qb[:, :, 0], kb[:, :, 0], vb[:, :, 0], dropout_p=dropout_p,
                                           is_causal=True, scale=scale)
    if blocks == 1:
        return first[:, :, :T]
    # Compiled, the mask is built in the graph: dynamo cannot trace through lru_cache.
    mask = pair_mask(window, q.device) if torch.compiler.is_compiling() else cached_pair_mask(window, q.device)
    # Blocks 1.. as a batch of (window)-query, (2 * window)-key problems: 4-D keeps the fused kernels.
    keys, values = (torch.cat([t[:, :, :-1], t[:, :, 1:]], dim=3).flatten(1, 2) for t in (kb, vb))
    rest = F.scaled_dot_product_attention(qb[:, :, 1:].flatten(1, 2), keys, values,
                                          attn_mask=mask, dropout_p=dropout_p, scale=scale)
    out = torch.cat([first.unsqueeze(2), rest.unflatten(1, (H, blocks - 1))], dim=2)
    return out.flatten(2, 3)[:, :, :T]
