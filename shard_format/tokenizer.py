"""The tokenizer a manifest records, as a tiktoken Encoding: GPT-2's byte-level BPE built from a
local `.tiktoken` ranks file, so neither the pipeline nor the trainer needs the network."""
from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from shard_format.files import sha256_file
from shard_format.manifest import TokenizerRecord

EOT_TEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the file or the tokenizer."""


@functools.lru_cache(maxsize=4)
def load_encoding(vocab_file: str, eot_id: int = 50256, name: str = "gpt2") -> tiktoken.Encoding:
    """GPT-2's pre-tokenization (tiktoken's r50k_base pattern) over the ranks in `vocab_file`."""
    try:
        ranks = load_tiktoken_bpe(str(vocab_file))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load {vocab_file}: {e}") from None
    return tiktoken.Encoding(name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: eot_id})


def recorded_vocab_file(tokenizer: TokenizerRecord) -> str | None:
    """The manifest's `vocab_file` while it is still there with the recorded sha256."""
    recorded = tokenizer.get("vocab_file")
    if recorded and Path(recorded).is_file() and sha256_file(recorded) == tokenizer["vocab_sha256"]:
        return recorded
    return None


def encoding_for(tokenizer: TokenizerRecord, vocab_file: str | None = None) -> tiktoken.Encoding:
    """From `vocab_file` when given, else from the manifest's recorded file when unchanged (both
    offline), else tiktoken's encoding of that name (which downloads its files on first use)."""
    vocab_file = vocab_file or recorded_vocab_file(tokenizer)
    if vocab_file:
        return load_encoding(str(vocab_file), int(tokenizer["eot_id"]), tokenizer["name"])
    try:
        return tiktoken.get_encoding(tokenizer["name"])
    except Exception as e:  # tiktoken raises whatever its download raised; offline that is common
        raise TokenizerError(f"cannot load tokenizer {tokenizer['name']!r} by name ({e})") from None
