"""Multi-head causal self-attention, dense or locally banded (GPT-3's alternating pattern).

Both kinds go through `F.scaled_dot_product_attention`, so PyTorch picks the fused kernel
for the device. Dense layers pass `is_causal=True` (no mask tensor at all); banded layers
pass a boolean band mask that is built once per (length, window, device) and shared by
every banded layer.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig


@functools.lru_cache(maxsize=16)
def banded_causal_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool mask, True where query i may attend key j: i - window < j <= i.

    Each query sees itself and the `window - 1` tokens before it. Cached because every banded
    layer of every step asks for the same mask; callers must not modify it.
    """
    i = torch.arange(seq_len, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < window)


class CausalSelfAttention(nn.Module):
    """Causal self-attention; `window` set makes it locally banded (sparse in GPT-3's sense)."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_model = cfg.d_model
        self.window = window
        self.dropout = cfg.dropout
        # Module names match Hugging Face GPT-2 so the weight mapping is a transpose, not a rename.
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.d_model, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if self.window is None or T <= self.window:
            # A band at least as long as the sequence is plain causal attention: take the fast path.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = banded_causal_mask(T, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
