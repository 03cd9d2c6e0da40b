"""A minimal PNG reader (8-bit RGB/RGBA, non-interlaced: what Chromium writes) into a numpy array,
so the screenshot test needs no imaging library. Filters None/Sub/Up are vectorised per row;
Average and Paeth depend on the pixel to the left and run per byte."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(data: bytes):
    pos = len(SIGNATURE)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 12 + length


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter(kind: int, line: bytes, prior: np.ndarray, bpp: int) -> np.ndarray:
    cur = np.frombuffer(line, dtype=np.uint8).copy()
    if kind == 0:
        return cur
    if kind == 2:
        return cur + prior  # uint8 arithmetic wraps mod 256, as the format requires
    if kind == 1:
        return (np.cumsum(cur.reshape(-1, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(-1)
    out, up = bytearray(cur.tobytes()), prior.tobytes()
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:
            out[i] = (out[i] + ((left + up[i]) >> 1)) & 0xFF
        else:
            out[i] = (out[i] + _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)) & 0xFF
    return np.frombuffer(bytes(out), dtype=np.uint8)


def read_png(path: Path | bytes) -> np.ndarray:
    """(height, width, channels) uint8, from a file or from the PNG's bytes."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    assert data.startswith(SIGNATURE), "not a PNG"
    idat, header = b"", None
    for kind, body in _chunks(data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unsupported PNG layout {header}"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp + 1
    rows, prior = [], np.zeros(width * bpp, dtype=np.uint8)
    for r in range(height):
        line = raw[r * stride:(r + 1) * stride]
        prior = _unfilter(line[0], line[1:], prior, bpp)
        rows.append(prior)
    return np.stack(rows).reshape(height, width, bpp)
