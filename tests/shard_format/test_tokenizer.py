import hashlib

import pytest

from shard_format import TokenizerError, encoding_for, load_encoding
from shard_format.tokenizer import recorded_vocab_file


def recorded(path) -> dict:
    return {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256, "vocab_file": str(path),
            "vocab_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_tokenizer_comes_from_the_manifests_vocab_file(shared_data):
    enc = encoding_for(recorded(shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken"))
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_a_changed_vocab_file_is_not_used(shared_data, tmp_path):
    copy = tmp_path / "r50k_base.tiktoken"
    copy.write_bytes((shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken").read_bytes())
    record = recorded(copy)
    assert recorded_vocab_file(record) == str(copy)
    copy.write_bytes(copy.read_bytes()[:-100])
    assert recorded_vocab_file(record) is None


def test_an_unreadable_vocab_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 ranks\n")
    with pytest.raises(TokenizerError, match=f"cannot load {bad}"):
        load_encoding(str(bad))
