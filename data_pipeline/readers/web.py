"""WARC (HTML responses), WET (extracted text) and WAT (metadata JSON) readers; ARC files too.

Robustness: a `.gz` WARC is read one gzip member (normally one record) at a time; a member
that fails to decompress is counted, logged with its byte offset, and skipped by re-syncing
at the next gzip header. A truncated member (a whole file gzipped as one stream and cut short)
gives back every complete record before the cut. Plain WARCs re-sync at the next `WARC/1.` line;
a plain ARC is one segment. warcio parses each record, and its warnings are logged with the file.
A file with nothing readable in it fails its task."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import mmap
import zlib
from collections.abc import Iterator
from pathlib import Path

from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from warcio.archiveiterator import ArchiveIterator

from data_pipeline.document import Document, StepStats, make_key
from data_pipeline.errors import InputError

log = logging.getLogger(__name__)
GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_MAGIC = b"WARC/1."
ARC_MAGIC = b"filedesc://"
READ_CHUNK = 1 << 20
HTML_TYPES = ("text/html", "application/xhtml+xml")


class DamagedSegment(Exception):
    """A byte range that could not be decompressed or parsed; the reader skips past it."""


def iter_gzip_members(data: mmap.mmap | bytes) -> Iterator[tuple[int, bytes | DamagedSegment]]:
    """(offset, decompressed member) for each gzip member; damaged ones come as exceptions."""
    pos = 0
    while pos < len(data):
        inflater, cursor, parts = zlib.decompressobj(31), pos, []
        try:
            while not inflater.eof and cursor < len(data):
                chunk = data[cursor:cursor + READ_CHUNK]
                parts.append(inflater.decompress(chunk))
                cursor += len(chunk)
        except zlib.error as e:
            yield pos, DamagedSegment(f"gzip data error ({e})")
            pos = _next_magic(data, GZIP_MAGIC, pos + 1)
            continue
        if not inflater.eof:  # cut short: the complete records decompressed so far still count
            partial = b"".join(parts) + inflater.flush()
            for offset, segment in iter_plain_segments(partial):
                if isinstance(segment, bytes) and _complete_record(segment):
                    yield pos, segment
                else:
                    yield pos, DamagedSegment(f"truncated gzip member (record at decompressed offset {offset})")
            return
        yield pos, b"".join(parts)
        pos = cursor - len(inflater.unused_data)


def _complete_record(segment: bytes) -> bool:
    """A WARC record holds its whole Content-Length after the header block."""
    head_end = segment.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    for line in segment[:head_end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return value.strip().isdigit() and len(segment) >= head_end + 4 + int(value.strip())
    return False


def iter_plain_segments(data: mmap.mmap | bytes) -> Iterator[tuple[int, bytes | DamagedSegment]]:
    """Split an uncompressed WARC at each `WARC/1.` line start (a damaged record only costs itself);
    an uncompressed ARC is one segment (warcio reads it whole)."""
    if data[:len(ARC_MAGIC)] == ARC_MAGIC:
        yield 0, bytes(data)
        return
    pos = 0 if data[:len(WARC_MAGIC)] == WARC_MAGIC else _next_magic(data, b"\n" + WARC_MAGIC, 0) + 1
    if pos > 0 or len(data) == 0:
        if len(data):
            yield 0, DamagedSegment("file does not start with a WARC record")
    while pos < len(data):
        end = _next_magic(data, b"\n" + WARC_MAGIC, pos + 1)
        yield pos, bytes(data[pos:end + 1 if end < len(data) else end])
        pos = end + 1


def _next_magic(data, magic: bytes, start: int) -> int:
    found = data.find(magic, start)
    return len(data) if found < 0 else found


def iter_warc_records(path: Path, stats: StepStats) -> Iterator[tuple[str, object, str]]:
    """(location, warcio record, content) for every parsable record; damage is counted and logged."""
    try:
        with open(path, "rb") as fh:
            if path.stat().st_size == 0:
                stats.notes["empty_file"] += 1
                return
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    segments = iter_gzip_members(data) if data[:2] == GZIP_MAGIC[:2] else iter_plain_segments(data)
    readable = damaged = 0
    for offset, segment in segments:
        location = f"{path}@{offset}"
        if isinstance(segment, DamagedSegment):
            damaged += 1
            _count_damage(stats, location, segment)
            continue
        try:
            for record, body in _parse_records(segment, location, stats):
                readable += 1
                yield location, record, body
        except Exception as e:  # warcio raises many types on malformed headers
            damaged += 1
            _count_damage(stats, location, DamagedSegment(f"malformed record ({type(e).__name__}: {e})"))
    if damaged and not readable:
        raise InputError(f"{path}: no readable WARC or ARC record ({damaged} damaged segments; is it a WARC file?)")


def _parse_records(segment: bytes, location: str, stats: StepStats) -> Iterator[tuple[object, bytes]]:
    """warcio's records of one segment; the warnings it writes to stderr are logged with the location."""
    records, warnings = [], io.StringIO()
    with contextlib.redirect_stderr(warnings):
        for record in ArchiveIterator(io.BytesIO(segment), no_record_parse=False, arc2warc=True):
            records.append((record, record.content_stream().read()))
    for line in filter(None, (ln.strip() for ln in warnings.getvalue().splitlines())):
        if line.startswith("WARNING"):
            stats.notes["read:warc_warning"] += 1
        log.warning("%s: warcio: %s", location, line)
    return records


def _count_damage(stats: StepStats, location: str, damage: DamagedSegment) -> None:
    stats.docs_in += 1
    stats.removed["read:damaged_record"] += 1
    stats.examples.setdefault("read:damaged_record", []).append(location)
    log.warning("%s: skipped: %s", location, damage)


def decode_body(body: bytes, declared: str | None) -> str:
    """Declared charset when it decodes cleanly, else resiliparse's detection (never raises)."""
    if declared:
        try:
            return body.decode(declared)
        except (LookupError, UnicodeDecodeError):
            pass
    return bytes_to_str(body, detect_encoding(body))


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset":
            return value.strip("\"' ") or None
    return None


def read_warc(path: Path, source: str, file_index: int, stats: StepStats, **_) -> Iterator[Document]:
    """HTML responses (status 200) as documents with `html` set; other records are noted."""
    for index, (location, record, body) in enumerate(iter_warc_records(path, stats)):
        content_type = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
        status = record.http_headers.get_statuscode() if record.http_headers else None
        if record.rec_type != "response" or not content_type.lower().startswith(HTML_TYPES) or status != "200":
            stats.notes[f"skipped_{record.rec_type}_record"] += 1
            continue
        stats.docs_in += 1
        stats.bytes_in += len(body)
        yield Document(id=record.rec_headers.get_header("WARC-Record-ID") or location, text="",
                       source=source, key=make_key(file_index, index),
                       url=record.rec_headers.get_header("WARC-Target-URI"),
                       html=decode_body(body, _charset(content_type)))


def read_wet(path: Path, source: str, file_index: int, stats: StepStats, **_) -> Iterator[Document]:
    """`conversion` records: text already extracted by the crawler."""
    for index, (location, record, body) in enumerate(iter_warc_records(path, stats)):
        if record.rec_type != "conversion":
            stats.notes[f"skipped_{record.rec_type}_record"] += 1
            continue
        stats.docs_in += 1
        stats.bytes_in += len(body)
        yield Document(id=record.rec_headers.get_header("WARC-Record-ID") or location,
                       text=body.decode("utf-8", errors="replace"), source=source,
                       key=make_key(file_index, index), url=record.rec_headers.get_header("WARC-Target-URI"))


def read_wat(path: Path, source: str, file_index: int, stats: StepStats, **_) -> Iterator[Document]:
    """`metadata` records of HTML responses: the page title and meta description as a document."""
    for index, (location, record, body) in enumerate(iter_warc_records(path, stats)):
        if record.rec_type != "metadata":
            stats.notes[f"skipped_{record.rec_type}_record"] += 1
            continue
        try:
            envelope = json.loads(body)["Envelope"]
        except (ValueError, KeyError, TypeError) as e:
            _count_damage(stats, location, DamagedSegment(f"bad WAT JSON ({e})"))
            continue
        text = _wat_text(envelope)
        if not text:
            stats.notes["skipped_metadata_without_html"] += 1
            continue
        stats.docs_in += 1
        stats.bytes_in += len(body)
        yield Document(id=record.rec_headers.get_header("WARC-Record-ID") or location, text=text,
                       source=source, key=make_key(file_index, index),
                       url=envelope.get("WARC-Header-Metadata", {}).get("WARC-Target-URI"))


def _wat_text(envelope: dict) -> str:
    html_meta = envelope.get("Payload-Metadata", {}).get("HTTP-Response-Metadata", {}).get("HTML-Metadata", {})
    title = html_meta.get("Head", {}).get("Title", "")
    descriptions = [m.get("content", "") for m in html_meta.get("Head", {}).get("Metas", [])
                    if m.get("name", "").lower() == "description"]
    return "\n".join(t for t in [title, *descriptions] if t)
