import gzip
import struct
import zlib

from data_pipeline.rdata import Unserializer, read_lazyload


def xdr(*parts) -> bytes:
    return b"".join(struct.pack(">i", p) if isinstance(p, int) else p for p in parts)


def charsxp(text: str) -> bytes:
    data = text.encode()
    return xdr(0x00040009, len(data), data)


HEADER = xdr(b"X\n", 3, 0x040300, 0x030500, 5, b"UTF-8")
LINES = xdr(16, 3) + charsxp("EMMA") + xdr(9, -1) + charsxp("By Jane Austen")  # NA in the middle


def test_character_vectors_and_na():
    assert Unserializer(HEADER + LINES).read() == ["EMMA", None, "By Jane Austen"]


def test_lazyload_database(tmp_path):
    blob = zlib.compress(HEADER + LINES)
    record = struct.pack(">i", len(HEADER + LINES)) + blob
    (tmp_path / "Rdata.rdb").write_bytes(record)
    # list(variables = list(emma = c(0L, len)), compressed = TRUE) with a names attribute
    names = xdr(0x00000002 | (1 << 10)) + xdr(1) + charsxp("names")
    variables = (xdr(19 | (1 << 9), 1) + xdr(13, 2, 0, len(record)) + names
                 + xdr(16, 1) + charsxp("emma") + xdr(254))
    index = xdr(19 | (1 << 9), 1) + variables + names + xdr(16, 1) + charsxp("variables") + xdr(254)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(HEADER + index))
    assert read_lazyload(tmp_path / "Rdata", "emma") == ["EMMA", None, "By Jane Austen"]
