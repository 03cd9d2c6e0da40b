"""GPT-2 BPE through tiktoken, built from a local `.tiktoken` ranks file (no network)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from data_pipeline.config import TokenizerConfig
from data_pipeline.document import Document, StepStats
from data_pipeline.errors import PipelineError
from data_pipeline.shards import sha256_file
from data_pipeline.step import Step

# GPT-2's pre-tokenization pattern (tiktoken's r50k_base).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TEXT = "<|endoftext|>"


@functools.lru_cache(maxsize=4)
def load_encoding(path: str, eot_id: int = 50256) -> tiktoken.Encoding:
    try:
        ranks = load_tiktoken_bpe(path)
    except (OSError, ValueError) as e:
        raise PipelineError(f"tokenizer.path: cannot load {path}: {e}") from None
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: eot_id})


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def tokenizer_info(config: TokenizerConfig) -> dict:
    """The manifest's `tokenizer` entry."""
    encoding = load_encoding(config.path, config.eot_id)
    if encoding.n_vocab > config.vocab_size:
        raise PipelineError(f"tokenizer.vocab_size: {config.vocab_size} is smaller than the "
                            f"tokenizer's {encoding.n_vocab} tokens ({config.path})")
    # vocab_file lets `pretrain eval` decode offline; vocab_sha256 is what identifies the tokenizer.
    return {"name": config.name, "vocab_size": config.vocab_size, "eot_id": config.eot_id,
            "vocab_sha256": sha256_file(Path(config.path)), "vocab_file": str(Path(config.path).resolve())}


class Tokenize(Step):
    """Text to token ids. "<|endoftext|>" inside a document is plain text, never the EOT id:
    the trainer alone puts EOT between documents."""

    name = "tokenize"

    def __init__(self, config: TokenizerConfig):
        self.encoding = load_encoding(config.path, config.eot_id)
        self.dtype = token_dtype(config.vocab_size)

    def process(self, doc: Document, stats: StepStats) -> Document | None:
        doc.tokens = np.asarray(self.encoding.encode_ordinary(doc.text), dtype=self.dtype)
        if doc.tokens.size == 0:
            stats.remove(doc, "tokenize:empty")
            return None
        stats.tokens += int(doc.tokens.size)
        return doc
