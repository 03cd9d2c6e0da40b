"""How token ids are stored in a shard's `tokens.npy`."""
from __future__ import annotations

import numpy as np

UINT16_VOCAB_LIMIT = 1 << 16


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the bytes for GPT-2-sized vocabs."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.uint32)
