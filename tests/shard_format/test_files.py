import hashlib
import os

from shard_format import atomic_write, sha256_file


def test_sha256_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, "step-1")
    atomic_write(target, b"step-2")
    assert target.read_text() == "step-2"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_write_keeps_the_usual_permissions(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic_write(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode
