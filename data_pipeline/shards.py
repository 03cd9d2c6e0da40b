"""Shard format (the contract the trainer reads; DESIGN.md § Shard format).

    DIR/manifest.json                 written last, atomically (`shard_format.manifest`)
    DIR/report.json                   per source and step: in, out, removed by reason, bytes, tokens, seconds
    DIR/<source>/shard-000000.tar     webdataset tars, one sample per document

A sample is two tar members sharing the key `<source>-<shard>-<index>` (6 digits each, e.g.
`books-000000-000017`): `<key>.tokens.npy`, a 1-D array of `shard_format.token_dtype` saved with
`np.save(allow_pickle=False)`, and `<key>.json`, `{"id", "url" or "title", "source", "tokens"}`.
Documents carry no end-of-text token; the trainer inserts it between documents when it packs
sequences.

Tars are written byte-for-byte deterministically (fixed mtime/owner/order) to a temp name and
renamed when complete, so the same input and config always give the same shard sha256s."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from shard_format import ShardRecord, sha256_file


def sample_key(source: str, shard: int, index: int) -> str:
    return f"{source}-{shard:06d}-{index:06d}"


def npy_bytes(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    return buffer.getvalue()


def sample_record(meta: dict, source: str, n_tokens: int) -> bytes:
    """The sample's `.json` member."""
    return json.dumps({**meta, "source": source, "tokens": int(n_tokens)}, sort_keys=True).encode()


def _member_bytes(payload: int) -> int:
    return tarfile.BLOCKSIZE + -(-payload // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # header + padded payload


def sample_bytes(meta: dict, source: str, n_tokens: int, dtype: np.dtype) -> int:
    """What a sample adds to a tar, known before writing it: shard boundaries can then be planned
    first and the shards written by several tasks, byte-identical to one writer's."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": (int(n_tokens),)})
    npy = header.tell() + int(n_tokens) * np.dtype(dtype).itemsize
    return _member_bytes(npy) + _member_bytes(len(sample_record(meta, source, n_tokens)))


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Writes one source's samples into `shard-NNNNNN.tar` files of about `target_bytes`, numbered
    from `first_shard`. A shard closes after the sample that brings it to `target_bytes`."""

    def __init__(self, out_dir: Path, source: str, target_bytes: int, first_shard: int = 0):
        self.dir, self.source, self.target_bytes, self.first_shard = out_dir / source, source, target_bytes, first_shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[ShardRecord] = []
        self.tar = None

    def add(self, meta: dict, tokens: np.ndarray) -> None:
        if self.tar is None:
            self._open()
        key = sample_key(self.source, self.first_shard + len(self.entries), self.samples)
        _add_member(self.tar, f"{key}.tokens.npy", npy_bytes(tokens))
        _add_member(self.tar, f"{key}.json", sample_record(meta, self.source, tokens.size))
        self.samples += 1
        self.tokens += int(tokens.size)
        if self.file.tell() >= self.target_bytes:
            self._finish()

    def close(self) -> list[ShardRecord]:
        if self.tar is not None:
            self._finish()
        return self.entries

    def _open(self) -> None:
        self.final = self.dir / f"shard-{self.first_shard + len(self.entries):06d}.tar"
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = self.tokens = 0

    def _finish(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        self.entries.append({"path": f"{self.source}/{self.final.name}", "source": self.source,
                             "samples": self.samples, "tokens": self.tokens,
                             "bytes": self.final.stat().st_size, "sha256": sha256_file(self.final)})
        self.tar = None


def iter_samples(path: Path):
    """(key, tokens, meta) per sample; member names are checked, nothing is unpickled."""
    with tarfile.open(path, "r") as tar:
        pending: dict[str, dict] = {}
        for member in tar:
            name = member.name
            if not member.isfile() or "/" in name or name.startswith(".") or "." not in name:
                raise ValueError(f"{path}: unexpected tar member {name!r}")
            key, suffix = name.split(".", 1)
            payload = tar.extractfile(member).read()
            sample = pending.setdefault(key, {})
            sample[suffix] = payload
            if {"tokens.npy", "json"} <= sample.keys():
                del pending[key]
                yield key, np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False), json.loads(sample["json"])
        if pending:
            raise ValueError(f"{path}: incomplete samples {sorted(pending)[:3]}")
