import time

from data_pipeline.extract import ExtractConfig
from data_pipeline.document import Document, StepStats
from data_pipeline.extract import ExtractHtml
from tests.data_pipeline.conftest import html_page, prose


def extract(step: ExtractHtml, html: str) -> tuple[Document | None, StepStats]:
    stats = StepStats()
    return step.process(Document(id="p", text="", source="web", key=0, html=html), stats), stats


def test_main_text_is_extracted_without_boilerplate():
    step = ExtractHtml(ExtractConfig(watchdog=False))
    html = html_page(prose(0, 5)).replace("<body>", "<body><nav><a href='/'>Home</a> | <a href='/x'>Menu</a></nav>")
    doc, _ = extract(step, html)
    assert doc.text.startswith("Sentence 0-0") and "Menu" not in doc.text and doc.html is None


def test_pathological_page_is_stopped_by_the_watchdog_and_the_worker_goes_on():
    step = ExtractHtml(ExtractConfig(time_limit_s=1.0))
    try:
        started = time.perf_counter()
        doc, stats = extract(step, "<div>" * 60_000 + "x")  # quadratic in resiliparse: minutes
        assert doc is None and stats.removed == {"extract:timeout": 1}
        assert time.perf_counter() - started < 15
        doc, _ = extract(step, html_page("Still working after the timeout."))
        assert doc.text == "Still working after the timeout."
    finally:
        step.close()


def test_oversized_html_is_cut_and_empty_pages_removed():
    step = ExtractHtml(ExtractConfig(watchdog=False, max_html_bytes=1000))
    doc, stats = extract(step, html_page(prose(1, 200)))
    assert stats.notes["html_truncated"] == 1 and 0 < len(doc.text) < 1000
    doc, stats = extract(step, "<html><body><script>var x;</script></body></html>")
    assert doc is None and stats.removed == {"extract:no_text": 1}
