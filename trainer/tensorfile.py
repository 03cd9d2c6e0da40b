"""Writing safetensors files one tensor at a time.

`safetensors.torch.save_file` turns every tensor into bytes before it writes any, so saving a
shard would hold it twice. The format is a little-endian u64 header length, a JSON header (dtype,
shape and byte range of each tensor, plus string metadata) and the raw bytes; once the shapes are
known the header can go first and each tensor after it, straight from its memory. Reading stays
with the library (`safetensors.safe_open`, lazy and memory-mapped).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from shard_format.files import fsync_dir

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


class SafetensorsWriter:
    """`with SafetensorsWriter(path, specs, metadata) as w: w.write(name, tensor)` for each spec, in order.
    specs: (name, shape, dtype). The file appears at `path` only when complete, as shard_format's
    atomic_write does it (temp file, fsync, rename, fsync of the directory)."""

    def __init__(self, path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset, self.order = 0, []
        for name, shape, dtype in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((name, tuple(shape), dtype))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.file = open(self.tmp, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, shape, dtype = self.order[self.next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: expected {want} {list(shape)} {dtype}, got {name} "
                             f"{list(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().cpu()
        self.file.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
        self.next += 1

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exc_type is None and self.next != len(self.order):
            self.tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensors were not written")
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)  # and the exception goes on
            return
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
