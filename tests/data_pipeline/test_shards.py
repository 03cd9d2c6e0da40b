import io
import tarfile

import numpy as np
import pytest

from data_pipeline.shards import ShardWriter, iter_samples
from data_pipeline.verify import verify_shard


def write(tmp_path, name: str) -> list[dict]:
    writer = ShardWriter(tmp_path / name, "books", target_bytes=8_000)
    for i in range(12):
        writer.add({"id": f"book/{i}", "title": "book"}, np.arange(i * 100, i * 100 + 500, dtype=np.uint16))
    return writer.close()


def test_shards_are_deterministic_and_sized(tmp_path):
    first, second = write(tmp_path, "a"), write(tmp_path, "b")
    assert [e["sha256"] for e in first] == [e["sha256"] for e in second]
    assert len(first) > 1 and [e["path"] for e in first][:2] == ["books/shard-000000.tar", "books/shard-000001.tar"]
    assert sum(e["samples"] for e in first) == 12 and sum(e["tokens"] for e in first) == 6000
    assert not list((tmp_path / "a/books").glob("*.tmp"))
    key, tokens, meta = next(iter_samples(tmp_path / "a" / first[0]["path"]))
    assert key == "books-000000-000000" and tokens.dtype == np.uint16 and tokens[:3].tolist() == [0, 1, 2]
    assert meta == {"id": "book/0", "title": "book", "source": "books", "tokens": 500}
    assert verify_shard(tmp_path / "a", first[0], 50257) == []


def test_one_corrupted_byte_fails_verification(tmp_path):
    entry = write(tmp_path, "a")[0]
    path = tmp_path / "a" / entry["path"]
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_shard(tmp_path / "a", entry, 50257)
    assert problems and all(p.startswith("books/shard-000000.tar") for p in problems)


def test_tar_member_names_are_checked(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../escape.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match="unexpected tar member"):
        list(iter_samples(path))
