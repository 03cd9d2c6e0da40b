import bz2
import gzip
from pathlib import Path

import zstandard

from data_pipeline.document import StepStats, file_index_of
from data_pipeline.readers import READERS
from data_pipeline.readers.text import split_text, strip_gutenberg
from tests.data_pipeline.conftest import html_page, prose, write_warc


def read(fmt: str, path: Path, **kwargs) -> tuple[list, StepStats]:
    stats = StepStats()
    docs = list(READERS[fmt](path, "src", 3, stats, max_doc_chars=kwargs.pop("max_doc_chars", 100_000), **kwargs))
    return docs, stats


def pages(n: int) -> list[tuple[str, str]]:
    return [(f"http://example.org/{i}", html_page(prose(i))) for i in range(n)]


def test_warc_gzip_and_plain_give_the_same_documents(tmp_path):
    gz, _ = read("warc", write_warc(tmp_path / "a.warc.gz", pages(3)))
    plain, _ = read("warc", write_warc(tmp_path / "a.warc", pages(3), gzip_records=False))
    assert [d.url for d in gz] == [d.url for d in plain] == [f"http://example.org/{i}" for i in range(3)]
    assert gz[0].html == plain[0].html and "harbour" not in gz[0].html and "Sentence 0-0" in gz[0].html
    assert file_index_of(gz[0].key) == 3


def test_truncated_gzip_warc_keeps_earlier_records_and_counts_the_loss(tmp_path):
    data = write_warc(tmp_path / "a.warc.gz", pages(4)).read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) - 200])
    docs, stats = read("warc", cut)
    assert len(docs) == 3
    assert stats.removed["read:damaged_record"] == 1
    assert any("cut.warc.gz@" in loc for loc in stats.examples["read:damaged_record"])


def test_garbage_mid_warc_is_skipped_and_later_records_still_read(tmp_path):
    for name, gz in (("g.warc.gz", True), ("g.warc", False)):
        data = write_warc(tmp_path / f"src-{name}", pages(4), gzip_records=gz).read_bytes()
        middle = len(data) // 2
        bad = tmp_path / name
        bad.write_bytes(data[:middle] + b"\x00\xffGARBAGE" * 50 + data[middle:])
        docs, stats = read("warc", bad)
        assert 3 <= len(docs) <= 4, name
        assert docs[-1].url == "http://example.org/3", name
        assert stats.removed["read:damaged_record"] >= 1, name
        assert stats.docs_in == len(docs) + sum(stats.removed.values())


def test_empty_files_give_no_documents(tmp_path):
    for fmt, name in (("warc", "e.warc.gz"), ("books", "e.txt"), ("jsonl", "e.jsonl")):
        (tmp_path / name).write_bytes(b"")
        docs, stats = read(fmt, tmp_path / name)
        assert docs == [] and stats.docs_in == 0


def test_shared_whirlwind_wet_and_wat(shared_data):
    wet, _ = read("wet", shared_data / "web/whirlwind.warc.wet.gz")
    assert len(wet) == 1 and wet[0].url == "https://an.wikipedia.org/wiki/Escopete" and "Escopete" in wet[0].text
    wat, stats = read("wat", shared_data / "web/whirlwind.warc.wat.gz")
    assert wat == [] and stats.notes["skipped_metadata_without_html"] == 1


def test_books_strip_gutenberg_and_split_long_books(shared_data):
    docs, stats = read("books", shared_data / "books/mobydick.txt", max_doc_chars=200_000)
    assert len(docs) == 7 and stats.docs_in == 7
    assert all(len(d.text) <= 200_000 for d in docs)
    joined = "".join(d.text for d in docs)
    assert "START OF THIS PROJECT GUTENBERG" not in joined and "END OF THIS PROJECT" not in joined
    assert "Call me Ishmael" in joined and docs[0].title == "mobydick"
    assert strip_gutenberg("head\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense").strip() == "body"


def test_fifty_megabyte_single_document_is_split(tmp_path):
    big = tmp_path / "big.txt"
    paragraph = ("word " * 200 + "\n\n").encode()
    big.write_bytes(paragraph * (50_000_000 // len(paragraph)))
    docs, stats = read("books", big, max_doc_chars=1_000_000)
    assert len(docs) >= 50 and max(len(d.text) for d in docs) <= 1_000_000
    assert split_text("a b c d e f", 4) == ["a b", "c d", "e f"]


def test_non_utf8_text_is_repaired_and_noted(tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait, d\xe9j\xe0 vu.\n".encode("latin-1") * 10)
    docs, stats = read("books", tmp_path / "latin1.txt")
    assert "Caf\ufffd" in docs[0].text
    assert stats.notes["invalid_utf8_replaced"] == 1
    assert "latin1.txt: invalid UTF-8 at byte 3" in caplog.text


def test_jsonl_plain_gz_zst_and_bad_lines(tmp_path):
    lines = [b'{"id": "a", "text": "first", "url": "http://a.org/"}', b"not json", b'{"id": "b"}',
             b'{"id": "c", "text": "caf\xe9"}', b'{"text": "no id"}']
    body = b"\n".join(lines) + b"\n"
    (tmp_path / "d.jsonl").write_bytes(body)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    for name in ("d.jsonl", "d.jsonl.gz", "d.jsonl.zst"):
        docs, stats = read("jsonl", tmp_path / name)
        assert [d.id for d in docs] == ["a", "c", f"{name}:5"], name
        assert docs[0].url == "http://a.org/"
        assert stats.removed == {"read:bad_json": 1, "read:missing_text_field": 1}
        assert stats.docs_in == 5 and stats.notes["invalid_utf8_replaced"] == 1
        assert f"{name}:2" in stats.examples["read:bad_json"][0]


def test_truncated_gzip_jsonl_keeps_earlier_lines(tmp_path):
    body = b"".join(b'{"text": "line %d ' % i + b"x" * 200 + b'"}\n' for i in range(500))
    data = gzip.compress(body)
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, stats = read("jsonl", tmp_path / "t.jsonl.gz")
    assert 0 < len(docs) < 500
    assert stats.removed["read:truncated_or_corrupt_input"] == 1


def test_wiki_skips_redirects_and_strips_markup(tmp_path):
    xml = """<mediawiki><page><title>Cat</title><ns>0</ns><id>1</id><revision><text>
'''Cat''' is a [[mammal|small mammal]].&lt;ref&gt;A source&lt;/ref&gt; {{Infobox|x=1}}
[[File:Cat.jpg|thumb|A cat]] [[Category:Animals]]
== Biology ==
Cats sleep a lot.</text></revision></page>
<page><title>Kitty</title><ns>0</ns><id>2</id><redirect title="Cat"/><revision><text>#REDIRECT [[Cat]]</text></revision></page>
<page><title>Talk:Cat</title><ns>1</ns><id>3</id><revision><text>chat</text></revision></page></mediawiki>"""
    (tmp_path / "w.xml.bz2").write_bytes(bz2.compress(xml.encode()))
    docs, stats = read("wiki", tmp_path / "w.xml.bz2")
    assert len(docs) == 1 and docs[0].title == "Cat" and docs[0].id == "wiki/1"
    text = docs[0].text
    assert "Cat is a small mammal." in text and "Cats sleep a lot." in text and "Biology" in text
    for junk in ("A source", "Infobox", "thumb", "Category", "[["):
        assert junk not in text
    assert stats.removed == {"read:redirect": 1, "read:not_an_article": 1}


def write_arc(path: Path, pages: list[tuple[str, str]]) -> Path:
    """An uncompressed ARC (version 1) file of HTML responses: Internet Archive's format before WARC."""
    head = b"1 0 InternetArchive\nURL IP-address Archive-date Content-type Archive-length\n"
    out = b"filedesc://%s 0.0.0.0 20200101000000 text/plain %d\n%s\n" % (path.name.encode(), len(head), head)
    for url, html in pages:
        body = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()
        out += b"%s 93.184.216.34 20200101000000 text/html %d\n%s\n" % (url.encode(), len(body), body)
    path.write_bytes(out)
    return path


def test_arc_files_are_read_plain_and_gzipped(tmp_path):
    plain, stats = read("warc", write_arc(tmp_path / "a.arc", pages(3)))
    gz, _ = read("warc", write_gz(tmp_path / "a.arc.gz", (tmp_path / "a.arc").read_bytes()))
    assert [d.url for d in plain] == [d.url for d in gz] == [f"http://example.org/{i}" for i in range(3)]
    assert "Sentence 0-0" in plain[0].html and not stats.removed


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def test_a_warc_gzipped_as_one_stream_and_cut_short_keeps_every_complete_record(tmp_path):
    """`gzip file.warc` makes one gzip member of the whole file; a cut loses only what it cut into."""
    plain = write_warc(tmp_path / "a.warc", pages(6), gzip_records=False).read_bytes()
    whole = gzip.compress(plain)
    cut = write_gz(tmp_path / "cut.warc.gz", b"")
    cut.write_bytes(whole[:int(len(whole) * 0.7)])
    docs, stats = read("warc", cut)
    complete, _ = read("warc", tmp_path / "a.warc")
    assert 2 <= len(docs) < 6 and [d.url for d in docs] == [d.url for d in complete[:len(docs)]]
    assert stats.removed["read:damaged_record"] >= 1


def test_a_file_that_is_not_a_warc_fails_its_input(tmp_path):
    import pytest

    from data_pipeline.errors import InputError

    path = tmp_path / "page.warc"
    path.write_text("<html><body>an HTML page saved under the wrong name</body></html>\n" * 20)
    with pytest.raises(InputError, match=f"{path}: no readable WARC or ARC record"):
        read("warc", path)


def test_a_wrong_jsonl_text_field_fails_the_input_naming_the_fields(tmp_path):
    import pytest

    from data_pipeline.errors import InputError

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"id": {i}, "content": "text {i}"}}\n' for i in range(150)))
    with pytest.raises(InputError, match=r"100 lines in a row have no string field 'text'; they have \['content', 'id'\]"):
        read("jsonl", path)
    docs, stats = read("jsonl", path, max_lines_without_text=200)  # fewer than the limit: skipped, counted
    assert docs == [] and stats.removed["read:missing_text_field"] == 150
    docs, _ = read("jsonl", path, text_field="content")
    assert len(docs) == 150


def test_warcio_warnings_name_the_file(tmp_path, caplog):
    plain = write_warc(tmp_path / "a.warc", pages(2), gzip_records=False).read_bytes()
    bad = plain.replace(b"Content-Length: 18\r\n", b"Content-Length: 10\r\n", 1)  # shorter than the record
    (tmp_path / "bad.warc").write_bytes(bad)
    read("warc", tmp_path / "bad.warc")
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all(m.startswith(f"{tmp_path / 'bad.warc'}@") for m in messages), messages
