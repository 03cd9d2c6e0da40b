"""The end-to-end benchmark's WARC builder: size, distinct URLs, and the planted duplicates."""
from __future__ import annotations

import pytest

from data_pipeline.document import StepStats
from data_pipeline.extract import html_to_text
from data_pipeline.readers.web import iter_warc_records
from bench.warc_corpus import build_corpus


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.slow
def test_corpus_has_its_size_distinct_urls_and_the_planted_duplicates(tmp_path, shared_data):
    summary = build_corpus(shared_data, tmp_path, target_mb=2, files=2, exact=0.15, near=0.15)
    records = [(r.rec_headers.get_header("WARC-Target-URI"), body) for path in sorted(tmp_path.glob("*.warc.gz"))
               for _, r, body in iter_warc_records(path, StepStats())]
    assert len(records) == summary["records"] and summary["files"] == ["bench-00000.warc.gz", "bench-00001.warc.gz"]
    assert 2e6 <= summary["html_bytes"] == sum(len(body) for _, body in records) < 2.3e6
    assert len({url for url, _ in records}) == len(records)

    earlier_payloads, earlier_texts, exact, near = set(), [], 0, 0
    for url, body in records:
        text = shingles(html_to_text(body.decode(), main_content=True))
        best = max((len(text & t) / len(text | t) for t in earlier_texts), default=0.0)
        if body in earlier_payloads:
            exact += 1
        elif "/n/" in url:  # a near duplicate: most 5-grams shared with an earlier record
            near += 1
            assert best > 0.8, url
        else:
            assert best < 0.5, url
        earlier_payloads.add(body)
        earlier_texts.append(text)
    assert (exact, near) == (summary["exact_duplicates"], summary["near_duplicates"]) and exact > 0 and near > 0
