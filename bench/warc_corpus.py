"""Build a large benchmark WARC from the sample crawl's HTML pages and the sample books/wiki text.

    .venv/bin/python bench/warc_corpus.py OUT_DIR [--data ../shared/data] [--mb 200] [--files 4]

Each response record is one of the crawl's HTML pages (a template) with every text run of its
body replaced by fresh words, 1-12 book/wiki paragraphs inserted after its first heading, a
distinct URL, and an inline JSON `<script>` state blob (as many real pages carry) that brings the
page to ~80 kB of HTML, about Common Crawl's average. Paragraphs are drawn at random from ~30k, so
documents rarely share 5-grams; a known fraction are planted duplicates of an earlier record:
exact (the same payload under another URL) and near (1% of the inserted words changed, another
script blob). The same seed gives the same bytes. Records are gzipped one per member, like Common Crawl's."""
from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from dataclasses import dataclass, field
from html import escape
from io import BytesIO
from pathlib import Path

import numpy as np
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.document import StepStats  # noqa: E402
from data_pipeline.extract import html_to_text  # noqa: E402
from data_pipeline.readers import READERS  # noqa: E402
from data_pipeline.readers.web import iter_warc_records  # noqa: E402

MAX_TEMPLATE_TEXT = 10_000  # the crawl's long table pages would make every document mostly one table
BLOCKS = re.compile(r"(<script\b.*?</script>|<style\b.*?</style>|<!--.*?-->)", re.S | re.I)
TEXT_RUN = re.compile(r">([^<]*[A-Za-z][^<]*)<")
VERSE = re.compile(r"^[1-3]?[A-Z][a-z]*\d+:\d+ ")
CRAWL_DATE = "2026-01-01T00:00:00Z"  # fixed, like the record ids, so a seed gives the same bytes


@dataclass
class Template:
    """A page cut at its text runs: `parts[i]` literal HTML, `slots[i]` words between parts i and i+1."""
    parts: list[str]
    slots: list[int]
    insert_at: int  # the index of the part after which the paragraphs go


@dataclass
class Spec:
    """Everything a page is generated from; a near duplicate changes only `edit_seed` and `blob_seed`."""
    template: int
    paragraphs: list[int]
    word_seed: int
    blob_seed: int
    edit_seed: int | None = None


@dataclass
class CorpusStats:
    records: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    html_bytes: int = 0
    files: list[str] = field(default_factory=list)


def passage_pool(data: Path) -> list[str]:
    """Paragraphs of the sample books (Bible verses grouped) and Wikipedia articles, >= 8 words each."""
    texts = [doc.text for path in sorted((data / "books").glob("*.txt"))
             for doc in READERS["books"](path, "books", 0, StepStats(), max_doc_chars=10**8)]
    texts += [doc.text for path in sorted((data / "wiki").glob("*.bz2"))
              for doc in READERS["wiki"](path, "wiki", 0, StepStats())]
    pool = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            pool += _chunks([VERSE.sub("", line).strip() for line in block.splitlines() if line.strip()])
    return [p for p in pool if len(p.split()) >= 8]


def _chunks(lines: list[str], words: int = 60) -> list[str]:
    """Lines joined into paragraphs of about `words` words, cut only after a sentence end."""
    out, current = [], []
    for line in lines:
        current.append(line)
        if sum(len(x.split()) for x in current) >= words and line.endswith((".", "!", "?", '"', "'")):
            out.append(" ".join(current))
            current = []
    return out + ([" ".join(current)] if current else [])


def load_templates(data: Path) -> list[Template]:
    """The crawl's HTML 200 responses with at most MAX_TEMPLATE_TEXT characters of extracted text."""
    templates = []
    for path in sorted((data / "web").glob("*.warc.gz")):
        for _, record, body in iter_warc_records(path, StepStats()):
            headers = record.http_headers
            if record.rec_type != "response" or not headers or headers.get_statuscode() != "200" \
                    or "html" not in headers.get_header("Content-Type", ""):
                continue
            html = body.decode("utf-8", errors="replace")
            if len(html_to_text(html, True)) <= MAX_TEMPLATE_TEXT:
                templates.append(cut_template(html))
    return templates


def cut_template(html: str) -> Template:
    """The body's text runs (outside scripts, styles and comments) become word slots; the
    paragraphs go after the part that closes the first <h1>."""
    body = html.lower().find("<body")
    parts, slots, cursor = [], [], 0
    offset = max(body, 0)
    for block in BLOCKS.split(html[offset:]):
        if not BLOCKS.fullmatch(block):  # scripts, styles and comments keep their text
            for run in TEXT_RUN.finditer(block):
                parts.append(html[cursor:offset + run.start(1)])
                slots.append(len(run.group(1).split()))
                cursor = offset + run.end(1)
        offset += len(block)
    parts.append(html[cursor:])
    heading = next((i for i, p in enumerate(parts) if re.search(r"</h1>", p, re.I)), 0)
    return Template(parts, slots, heading)


def render(spec: Spec, templates: list[Template], pool: list[str], blob_kb: int) -> str:
    template = templates[spec.template]
    words = " ".join(pool[i] for i in np.random.default_rng(spec.word_seed).integers(len(pool), size=40)).split()
    paragraphs = [pool[i] for i in spec.paragraphs]
    if spec.edit_seed is not None:
        paragraphs = [_edit(p, np.random.default_rng([spec.edit_seed, i]), words) for i, p in enumerate(paragraphs)]
    out, used = [], 0
    for i, part in enumerate(template.parts):
        out.append(part)
        if i == template.insert_at:
            out.append("".join(f"<p>{escape(p)}</p>\n" for p in paragraphs))
        if i < len(template.slots):
            n = template.slots[i]
            out.append(escape(" ".join(words[(used + k) % len(words)] for k in range(n))))
            used += n
    html = "".join(out)
    head_end = max(html.lower().find("</head>"), 0)
    return html[:head_end] + state_blob(spec.blob_seed, words, blob_kb) + html[head_end:]


def _edit(paragraph: str, rng: np.random.Generator, words: list[str], rate: float = 0.01) -> str:
    tokens = paragraph.split()
    for i in np.flatnonzero(rng.random(len(tokens)) < rate):
        tokens[i] = words[int(rng.integers(len(words)))]
    return " ".join(tokens)


def state_blob(seed: int, words: list[str], mean_kb: int) -> str:
    """An inline JSON state object of ~mean_kb (uniform 0.25x-1.75x): ids, titles and counts."""
    rng = np.random.default_rng(seed)
    size = int(mean_kb * 1000 * rng.uniform(0.25, 1.75))
    items, length = [], 0
    while length < size:
        start = int(rng.integers(len(words)))
        item = {"id": f"{int(rng.integers(1 << 48)):012x}", "title": " ".join(words[start:start + 8]),
                "views": int(rng.integers(10**6))}
        items.append(item)
        length += len(json.dumps(item))
    return f'<script type="application/json" id="state">{json.dumps({"items": items})}</script>\n'


def plan(n: int, templates: int, pool: int, rng: np.random.Generator,
         exact: float, near: float) -> list[tuple[Spec, str]]:
    """(spec, kind) per record; kind is "unique", "exact" or "near" (a copy of an earlier unique record)."""
    records: list[tuple[Spec, str]] = []
    for i in range(n):
        draw = rng.random()
        if i >= 10 and draw < exact + near:
            original = records[int(rng.integers(i))][0]
            kind = "exact" if draw < exact else "near"
            spec = original if kind == "exact" else Spec(original.template, original.paragraphs, original.word_seed,
                                                         int(rng.integers(2**31)), int(rng.integers(2**31)))
        else:
            kind = "unique"
            spec = Spec(int(rng.integers(templates)), rng.integers(pool, size=int(rng.integers(1, 13))).tolist(),
                        int(rng.integers(2**31)), int(rng.integers(2**31)))
        records.append((spec, kind))
    return records


def write_record(writer: WARCWriter, url: str, html: bytes, record_id: uuid.UUID) -> None:
    http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                       ("Content-Length", str(len(html)))], protocol="HTTP/1.1")
    headers = {"WARC-Record-ID": f"<urn:uuid:{record_id}>", "WARC-Date": CRAWL_DATE,
               "WARC-Identified-Payload-Type": "text/html"}  # datatrove's reader needs no libmagic sniffing then
    writer.write_record(writer.create_warc_record(url, "response", payload=BytesIO(html), http_headers=http,
                                                  warc_headers_dict=headers))


def build_corpus(data: Path, out_dir: Path, target_mb: float = 200, files: int = 4, seed: int = 0,
                 exact: float = 0.03, near: float = 0.03, blob_kb: int = 60) -> dict:
    """Write `files` WARCs with >= target_mb MB of HTML payload in all; returns the counts (also in corpus.json)."""
    templates, pool = load_templates(data), passage_pool(data)
    mean_page = sum(len("".join(t.parts)) for t in templates) / len(templates) + blob_kb * 1000
    records = plan(int(target_mb * 1e6 / mean_page * 1.5) + 10, len(templates), len(pool),
                   np.random.default_rng(seed), exact, near)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, i = CorpusStats(), 0
    for f in range(files):  # records in order, each file ending when its share of the bytes is written
        path = out_dir / f"bench-{f:05d}.warc.gz"
        with open(path, "wb") as fh:
            writer = WARCWriter(fh, gzip=True)
            while stats.html_bytes < target_mb * 1e6 * (f + 1) / files:
                spec, kind = records[i]
                html = render(spec, templates, pool, blob_kb).encode()
                write_record(writer, f"https://site{i % 997:03d}.example.org/{kind[0]}/{i:07d}.html", html,
                             uuid.UUID(int=seed << 64 | i))
                stats.records += 1
                stats.html_bytes += len(html)
                stats.exact_duplicates += kind == "exact"
                stats.near_duplicates += kind == "near"
                i += 1
        stats.files.append(path.name)
    summary = {**stats.__dict__, "warc_gz_bytes": sum((out_dir / n).stat().st_size for n in stats.files),
               "templates": len(templates), "paragraph_pool": len(pool), "seed": seed}
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory for the .warc.gz files and corpus.json")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--mb", type=float, default=200, help="HTML payload to write, in MB (default 200)")
    parser.add_argument("--files", type=int, default=4, help="split into this many WARC files (Ray runs one task each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build_corpus(Path(args.data), Path(args.out), args.mb, args.files, args.seed), indent=1))


if __name__ == "__main__":
    main()
