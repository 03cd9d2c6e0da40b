"""The run's tokenizer as Hugging Face tokenizer files: `AutoTokenizer.from_pretrained(OUT)` works offline
and encodes as the shards were encoded.

GPT-2's byte-level BPE is rebuilt from the tiktoken ranks the manifest records (transformers'
TikTokenConverter: the vocabulary is GPT-2's encoder.json; the merges are every split of each token into two
tokens, ranked by the merged token, which is tiktoken's rule). The ids after the vocabulary that the model
has (trainer.special_tokens: <pad>, <extra_id_0..99>) are added as special tokens with those ids; pad is
the pad token where the model has it, <|endoftext|> is bos, eos and unk, as in GPT-2's tokenizer.
"""
from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from shard_format import EOT_TEXT, TokenizerError, TokenizerRecord, encoding_for
from trainer.errors import TrainError
from trainer.special_tokens import NAMES, PAD

CHECK_TEXT = "Emma Woodhouse, handsome, clever, and rich<|endoftext|> 1234  x\n\n\t<pad>é <extra_id_0>!"


def run_encoding(record: TokenizerRecord):
    """The manifest's tiktoken encoding; TrainError when it cannot be loaded."""
    try:
        return encoding_for(record)
    except TokenizerError as e:
        raise TrainError(f"tokenizer: {e}") from None


def hf_tokenizer(record: TokenizerRecord, vocab_size: int, model_max_length: int):
    """A transformers GPT2Tokenizer equal to the run's tokenizer, with the special ids below vocab_size."""
    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = run_encoding(record)
    with tempfile.TemporaryDirectory() as tmp:  # the converter reads a ranks file; the encoding may have none
        ranks_file = str(Path(tmp) / "ranks.tiktoken")
        ranks = sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1])  # tiktoken's file format
        Path(ranks_file).write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
        vocab, merges = TikTokenConverter(vocab_file=ranks_file).extract_vocab_merges_from_model(ranks_file)
    vocab[EOT_TEXT] = encoding.eot_token
    specials = {i: name for i, name in sorted(NAMES.items()) if i < vocab_size}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                              pad_token=specials.get(PAD))
    tokenizer.add_special_tokens({"additional_special_tokens": [n for i, n in specials.items() if i != PAD]})
    moved = {name: i for i, name in specials.items() if tokenizer.convert_tokens_to_ids(name) != i}
    if moved:
        raise TrainError(f"tokenizer: special tokens {sorted(moved)} do not get their ids {sorted(moved.values())} "
                         f"after the {len(vocab)}-token vocabulary")
    return tokenizer


def check_tokenizer(out: Path, record: TokenizerRecord, vocab_size: int) -> None:
    """AutoTokenizer from `out`, offline, encodes CHECK_TEXT as the run's tokenizer does; TrainError if not."""
    from transformers import AutoTokenizer

    from trainer.sample import Codec

    want = Codec(run_encoding(record), vocab_size).encode(CHECK_TEXT)
    got = AutoTokenizer.from_pretrained(out, local_files_only=True)(CHECK_TEXT)["input_ids"]
    if got != want:
        raise TrainError(f"export check failed: the exported tokenizer encodes {CHECK_TEXT!r} as {got}, "
                         f"the run's as {want}")
