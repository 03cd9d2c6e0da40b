"""Reads back what a wandb run logged from its transaction log (RUN/wandb/*/run-*.wandb): the file
is LevelDB's log format (32 KiB blocks; each chunk a 7-byte header of crc32, little-endian length and
type: full, first, middle, last) after a 7-byte ":W&B" header, and each record is wandb's own
protobuf `Record`. wandb 0.31 ships no Python reader (the Go core writes the file), so the tests
decode it here with wandb's protobuf schema."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break  # zero padding at the end of the file
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(run_dir: Path) -> list[dict]:
    """One dict per logged step, keys as logged (nested keys joined by '.')."""
    (log,) = Path(run_dir).glob("wandb/*-run-*/run-*.wandb")  # not wandb/latest-run, a link to the same run
    rows = []
    for record in records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
