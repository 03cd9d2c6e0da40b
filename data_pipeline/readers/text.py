"""Plain-text readers: books (Project Gutenberg boilerplate stripped, long books split),
JSONL (plain, .gz or .zst; configurable fields) and Wikipedia XML dumps (.bz2; wikitext
markup stripped, redirects and non-article pages skipped)."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import mwparserfromhell
import zstandard

from data_pipeline.document import Document, StepStats, make_key
from data_pipeline.errors import InputError

log = logging.getLogger(__name__)
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.M | re.I)
STREAM_ERRORS = (EOFError, OSError, zstandard.ZstdError, ET.ParseError)


def decode_text(raw: bytes, location: str, stats: StepStats) -> str:
    """UTF-8; invalid bytes become U+FFFD, noted and logged with the first bad offset."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.notes["invalid_utf8_replaced"] += 1
        log.warning("%s: invalid UTF-8 at byte %d, replaced with U+FFFD", location, e.start)
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n")


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars`, cut at paragraph, then line, then space boundaries."""
    pieces = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cut = max(window.rfind("\n\n"), window.rfind("\n") if "\n\n" not in window else -1)
        if cut < max_chars // 2:
            cut = window.rfind(" ")
        cut = cut if cut > 0 else max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].lstrip()
    pieces.append(text.strip())
    return [p for p in pieces if p]


def strip_gutenberg(text: str) -> str:
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    return text[:end.start()] if end else text


def read_books(path: Path, source: str, file_index: int, stats: StepStats, *, max_doc_chars: int,
               strip_gutenberg_boilerplate: bool = True, **_) -> Iterator[Document]:
    """One book per file; a long book becomes several documents `<stem>/<part>`."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    if not raw.strip():
        stats.notes["empty_file"] += 1
        return
    stats.bytes_in += len(raw)
    text = decode_text(raw, str(path), stats).lstrip("\ufeff")
    if strip_gutenberg_boilerplate:
        text = strip_gutenberg(text)
    parts = split_text(text, max_doc_chars)
    stats.docs_in += len(parts)  # documents, not files: a long book yields several
    stats.notes["files"] += 1
    for index, part in enumerate(parts):
        yield Document(id=f"{path.stem}/{index:04d}", text=part, source=source,
                       key=make_key(file_index, index), title=path.stem)


def open_text_stream(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def read_jsonl(path: Path, source: str, file_index: int, stats: StepStats, *, max_doc_chars: int,
               text_field: str = "text", id_field: str = "id", url_field: str | None = "url",
               max_lines_without_text: int = 100, **_) -> Iterator[Document]:
    """One JSON object per line; bad lines are counted and logged with their line number. So many
    objects in a row without `text_field` that it must be the wrong name fail the input, naming the
    fields they do have."""
    index, without_text, fields_seen = 0, 0, set()
    for line_no, raw in _lines(path, stats):
        if not raw.strip():
            continue
        location = f"{path}:{line_no}"
        stats.docs_in += 1
        stats.bytes_in += len(raw)
        record, fields = _parse_json_record(decode_text(raw, location, stats), location, text_field, stats)
        if fields is not None:
            without_text, fields_seen = without_text + 1, fields_seen | set(fields)
            if without_text >= max_lines_without_text:
                raise InputError(f"{path}: {without_text} lines in a row have no string field {text_field!r}; "
                                 f"they have {sorted(fields_seen)[:12]}: set the source's text_field")
        if record is None:
            continue
        without_text = 0
        doc_id = str(record.get(id_field, f"{path.name}:{line_no}"))
        url = record.get(url_field) if url_field else None
        parts = split_text(record[text_field], max_doc_chars)
        stats.docs_in += max(len(parts), 1) - 1
        if not parts:
            stats.remove(Document(id=location, text="", source=source, key=0), "read:empty_text")
        for part_no, part in enumerate(parts):
            yield Document(id=doc_id if part_no == 0 else f"{doc_id}/{part_no}", text=part, source=source,
                           key=make_key(file_index, index), url=url if isinstance(url, str) else None)
            index += 1


def _lines(path: Path, stats: StepStats) -> Iterator[tuple[int, bytes]]:
    try:
        stream = open_text_stream(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    line_no = 0
    with stream:
        try:
            for line_no, raw in enumerate(io.BufferedReader(stream) if path.suffix == ".zst" else stream, 1):
                yield line_no, raw
        except STREAM_ERRORS as e:
            stats.docs_in += 1
            stats.removed["read:truncated_or_corrupt_input"] += 1
            log.warning("%s: unreadable after line %d (%s); kept what came before", path, line_no, e)


def _parse_json_record(text: str, location: str, text_field: str,
                       stats: StepStats) -> tuple[dict | None, list[str] | None]:
    """(the record, None), or (None, the fields it has instead) when it lacks text_field, or (None, None)."""
    fields = None
    try:
        record = json.loads(text)
    except ValueError as e:
        reason, detail = "read:bad_json", str(e)
    else:
        if isinstance(record, dict) and isinstance(record.get(text_field), str):
            return record, None
        fields = list(record) if isinstance(record, dict) else []
        reason, detail = "read:missing_text_field", f"no string field {text_field!r}"
    stats.removed[reason] += 1
    stats.examples.setdefault(reason, []).append(location)
    log.warning("%s: skipped: %s", location, detail)
    return None, fields


def read_wiki(path: Path, source: str, file_index: int, stats: StepStats, **_) -> Iterator[Document]:
    """Main-namespace articles of a MediaWiki XML dump, wikitext stripped to plain text."""
    index = 0
    try:
        stream = open_text_stream(path)
        with stream:
            for page in _iter_pages(stream):
                stats.docs_in += 1
                doc = _wiki_document(page, source, make_key(file_index, index), stats)
                index += 1
                if doc is not None:
                    stats.bytes_in += len(doc.text)
                    yield doc
    except STREAM_ERRORS as e:
        if index == 0:
            raise InputError(f"{path}: not a readable MediaWiki XML dump: {e}") from None
        stats.docs_in += 1
        stats.removed["read:truncated_or_corrupt_input"] += 1
        log.warning("%s: unreadable after page %d (%s); kept what came before", path, index, e)


def _iter_pages(stream) -> Iterator[dict]:
    for _, elem in ET.iterparse(stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        revision = fields.get("revision")
        text = next((c.text for c in revision if c.tag.endswith("text")), "") if revision is not None else ""
        yield {"title": fields["title"].text if "title" in fields else "", "id": fields["id"].text if "id" in fields else "",
               "ns": fields["ns"].text if "ns" in fields else "0", "redirect": "redirect" in fields, "text": text or ""}
        elem.clear()


def _wiki_document(page: dict, source: str, key: int, stats: StepStats) -> Document | None:
    doc = Document(id=f"wiki/{page['id']}", text="", source=source, key=key, title=page["title"])
    if page["redirect"] or page["text"].lstrip().lower().startswith("#redirect"):
        stats.remove(doc, "read:redirect")
    elif page["ns"] != "0":
        stats.remove(doc, "read:not_an_article")
    else:
        doc.text = wikitext_to_text(page["text"])
        return doc
    return None


# Cheap regex passes before the (slow) full parse: references and comments are a large share
# of article wikitext and never part of the plain text.
WIKI_PREPASS = re.compile(r"<!--.*?-->|<ref[^>]*/>|<ref[^>/]*>.*?</ref>", re.S | re.I)
DROPPED_LINK_NAMESPACES = ("file", "image", "category")


def wikitext_to_text(wikitext: str) -> str:
    """Plain text: templates, tables, refs, files and categories dropped; headings kept as lines."""
    code = mwparserfromhell.parse(WIKI_PREPASS.sub("", wikitext))
    pieces = []
    for node in code.nodes:
        if isinstance(node, mwparserfromhell.nodes.Wikilink) and \
                str(node.title).split(":", 1)[0].strip().lower() in DROPPED_LINK_NAMESPACES:
            continue
        stripped = node.__strip__(normalize=True, collapse=True, keep_template_params=False)
        if stripped:
            pieces.append(str(stripped))
    lines = (line.strip() for line in "".join(pieces).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
