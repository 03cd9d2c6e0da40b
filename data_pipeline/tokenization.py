"""The tokenize step: text to GPT-2 BPE ids (`shard_format.load_encoding`, from a local
`.tiktoken` ranks file, no network), and the manifest's record of the tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import tiktoken
from pydantic import Field

from data_pipeline.document import Document, StepStats
from data_pipeline.errors import PipelineError
from data_pipeline.schema import Section
from data_pipeline.step import Step
from shard_format import TokenizerError, TokenizerRecord, load_encoding, sha256_file, token_dtype


class TokenizerConfig(Section):
    name: Literal["gpt2"] = "gpt2"
    path: str = "../shared/data/tokenizer/gpt2/r50k_base.tiktoken"
    eot_id: int = 50256
    vocab_size: int = Field(50257, gt=0)


def encoding_for_config(config: TokenizerConfig) -> tiktoken.Encoding:
    try:
        return load_encoding(config.path, config.eot_id, config.name)
    except TokenizerError as e:
        raise PipelineError(f"tokenizer.path: {e}") from None


def tokenizer_record(config: TokenizerConfig) -> TokenizerRecord:
    """The manifest's `tokenizer` entry."""
    encoding = encoding_for_config(config)
    if encoding.n_vocab > config.vocab_size:
        raise PipelineError(f"tokenizer.vocab_size: {config.vocab_size} is smaller than the "
                            f"tokenizer's {encoding.n_vocab} tokens ({config.path})")
    # vocab_file lets `pretrain eval` decode offline; vocab_sha256 is what identifies the tokenizer.
    return {"name": config.name, "vocab_size": config.vocab_size, "eot_id": config.eot_id,
            "vocab_sha256": sha256_file(config.path), "vocab_file": str(Path(config.path).resolve())}


class Tokenize(Step):
    """Text to token ids. "<|endoftext|>" inside a document is plain text, never the EOT id:
    the trainer alone puts EOT between documents."""

    name = "tokenize"

    def __init__(self, config: TokenizerConfig):
        self.encoding = encoding_for_config(config)
        self.dtype = token_dtype(config.vocab_size)

    def process(self, doc: Document, stats: StepStats) -> Document | None:
        doc.tokens = np.asarray(self.encoding.encode_ordinary(doc.text), dtype=self.dtype)
        if doc.tokens.size == 0:
            stats.remove(doc, "tokenize:empty")
            return None
        stats.tokens += int(doc.tokens.size)
        return doc
