import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import PipelineConfig
from data_pipeline.document import make_key
from data_pipeline.shards import ShardWriter, iter_samples, sample_bytes
from data_pipeline.stages import DEDUP_DIR, plan_shards, task_dir, write_shard
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


def test_sample_bytes_is_what_the_tar_grows_by(tmp_path):
    writer = ShardWriter(tmp_path, "web", target_bytes=10**9)
    for n, meta in [(0, {"id": "a"}), (1, {"id": "b", "url": "http://x/é"}), (12345, {"id": "c" * 300})]:
        before = writer.file.tell() if writer.tar else 0
        writer.add(meta, np.zeros(n, np.uint16))
        assert writer.file.tell() - before == sample_bytes(meta, "web", n, np.uint16)
    writer.close()


def fake_work(tmp_path, docs_per_input: list[int], removed: list[int]) -> tuple[Path, list[tuple]]:
    """Stage-1 output of several inputs (docs.jsonl, tokens.bin, sigs.npz) and a dedup result."""
    work, rng, docs = tmp_path / "_work", np.random.default_rng(0), []
    for index, count in enumerate(docs_per_input):
        folder = task_dir(work, index)
        folder.mkdir(parents=True)
        keys, lengths = [make_key(index, i) for i in range(count)], rng.integers(1, 900, count)
        with open(folder / "docs.jsonl", "w") as fh, open(folder / "tokens.bin", "wb") as tok:
            for key, n in zip(keys, lengths):
                meta, tokens = {"id": f"d{key}", "url": f"http://x/{key}"}, rng.integers(0, 50257, n).astype(np.uint16)
                fh.write(json.dumps({"key": key, **meta}) + "\n")
                tok.write(tokens.tobytes())
                if key not in removed:
                    docs.append((meta, tokens))
        np.savez(folder / "sigs.npz", keys=np.array(keys, np.int64), tokens=lengths.astype(np.int64),
                 sizes=np.array([sample_bytes({"id": f"d{k}", "url": f"http://x/{k}"}, "web", n, np.uint16)
                                 for k, n in zip(keys, lengths)], np.int64))
    (work / DEDUP_DIR).mkdir()
    np.savez(work / DEDUP_DIR / "removed.npz", exact=np.array(sorted(removed[:2]), np.int64),
             near=np.array(sorted(removed[2:]), np.int64))
    return work, docs


def test_shards_planned_and_written_in_parallel_equal_one_writer(tmp_path):
    removed = [make_key(0, 3), make_key(2, 0), make_key(0, 4), make_key(3, 1)]
    work, docs = fake_work(tmp_path, [40, 0, 25, 2, 30], removed)
    config = PipelineConfig.model_validate({"sources": [{"name": "web", "format": "warc", "inputs": ["x"], "weight": 1},
                                                        ], "shards": {"target_bytes": 9_000}})
    serial = ShardWriter(tmp_path / "serial", "web", 9_000)
    for meta, tokens in docs:
        serial.add(meta, tokens)
    expected = serial.close()
    indices = {"web": [0, 1, 2, 3, 4]}
    plans = plan_shards("web", indices["web"], config, work, tmp_path / "out")
    assert len(plans) == len(expected) > 5 and sum(p["samples"] for p in plans) == len(docs) == 93
    written = [write_shard(p, indices, config, work, tmp_path / "out") for p in reversed(plans)]  # any order
    assert [w["shard"] for w in reversed(written)] == expected
    for entry in expected:
        assert (tmp_path / "out" / entry["path"]).read_bytes() == (tmp_path / "serial" / entry["path"]).read_bytes()
