"""Just enough of R's serialization format to read character vectors out of an R package's
lazy-load data base (`data/Rdata.rdx` + `Rdata.rdb`), which is how Debian ships the Jane
Austen and Moby Dick texts the sample data uses. Only data is decoded; nothing is evaluated."""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

NIL_TYPES = {254, 242}  # NILVALUE_SXP, and the empty environment
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, REFSXP = 1, 2, 9, 10, 13, 14, 16, 19, 255
DECOMPRESSORS = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}


class RDataError(ValueError):
    pass


class Unserializer:
    """XDR-format (`X\\n`) R serialization, versions 2 and 3."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise RDataError("not an XDR R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            encoding_length = self._int()  # then the native encoding's name
            self.pos += encoding_length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _array(self, fmt: str, size: int) -> list:
        n = self._int()
        values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
        self.pos += size * n
        return values

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in NIL_TYPES:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == SYMSXP:
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == CHARSXP:
            return self._chars()
        if kind == LISTSXP:
            return self._pairlist(has_attr, has_tag)
        return self._vector(kind, has_attr)

    def _chars(self) -> str | None:
        n = self._int()
        if n == -1:
            return None
        text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def _pairlist(self, has_attr: int, has_tag: int) -> list[tuple]:
        if has_attr:
            self.read()
        tag = self.read() if has_tag else None
        head = self.read()
        rest = self.read()
        return [(tag, head)] + (rest or [])

    def _vector(self, kind: int, has_attr: int):
        if kind in (STRSXP, VECSXP):
            values = [self.read() for _ in range(self._int())]
        elif kind in (INTSXP, LGLSXP):
            values = self._array("i", 4)
        elif kind == REALSXP:
            values = self._array("d", 8)
        else:
            raise RDataError(f"unsupported R object type {kind}")
        names = dict(self.read()).get("names") if has_attr else None
        return dict(zip(names, values)) if names and kind == VECSXP else values


def read_lazyload(base: Path, name: str):
    """Object `name` of the lazy-load DB `base`.rdx/.rdb (e.g. `.../data/Rdata`)."""
    raw_index = base.with_suffix(".rdx").read_bytes()
    index = Unserializer(gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else zlib.decompress(raw_index[4:]))
    variables = index.read()["variables"]
    if name not in variables:
        raise RDataError(f"{base}.rdx: no object {name!r} (has {sorted(variables)})")
    offset, length = variables[name]
    with open(base.with_suffix(".rdb"), "rb") as fh:
        fh.seek(offset)
        blob = fh.read(length)[4:]  # 4 bytes: uncompressed length
    payload = DECOMPRESSORS[blob[:1]](blob[1:]) if blob[:1] in DECOMPRESSORS else zlib.decompress(blob)
    return Unserializer(payload).read()
