"""HTML to text with resiliparse. resiliparse's C++ code cannot be interrupted by a signal and
some pages take it quadratic time (deeply nested elements), so pages run in a watchdog child
process that is killed and restarted when a page exceeds `time_limit_s`."""
from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing.connection import Connection

from pydantic import Field
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree

from data_pipeline.document import Document, StepStats
from data_pipeline.schema import Section
from data_pipeline.step import Step

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 120


class ExtractConfig(Section):
    """A page runs in the watchdog process so a pathological page costs at most `time_limit_s`;
    pages above `max_html_bytes` are cut to that size first."""
    time_limit_s: float = Field(5.0, gt=0)
    max_html_bytes: int = Field(2_000_000, gt=0)
    main_content: bool = True
    watchdog: bool = True


def html_to_text(html: str, main_content: bool) -> str:
    tree = HTMLTree.parse(html)
    return extract_plain_text(tree, main_content=main_content, alt_texts=False, links=False,
                              list_bullets=True, preserve_formatting=True).strip()


def _serve(conn: Connection, main_content: bool) -> None:
    conn.send("ready")
    while True:
        html = conn.recv()
        if html is None:
            return
        conn.send(html_to_text(html, main_content))


class WatchdogExtractor:
    """A child process that extracts one page at a time; `extract` returns None on timeout."""

    def __init__(self, main_content: bool, time_limit_s: float):
        self.main_content, self.time_limit_s = main_content, time_limit_s
        self.process = None

    def _start(self) -> None:
        # spawn, not fork: Ray workers run threads, and a forked copy of their locks can hang.
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.main_content), daemon=True)
        self.process.start()
        child.close()
        # The limit is per page: wait for the interpreter to start before the clock runs.
        if not self.conn.poll(STARTUP_TIMEOUT_S) or self.conn.recv() != "ready":
            raise RuntimeError("HTML extraction process did not start")

    def extract(self, html: str) -> str | None:
        if self.process is None or not self.process.is_alive():
            self._start()
        self.conn.send(html)
        if self.conn.poll(self.time_limit_s):
            return self.conn.recv()
        self.process.kill()
        self.process.join()
        self.process = None
        return None

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
        self.process = None


class ExtractHtml(Step):
    name = "extract"

    def __init__(self, config: ExtractConfig):
        self.config = config
        self.watchdog = WatchdogExtractor(config.main_content, config.time_limit_s) if config.watchdog else None

    def process(self, doc: Document, stats: StepStats) -> Document | None:
        if doc.html is None:
            return doc
        html, doc.html = doc.html, None
        if len(html) > self.config.max_html_bytes:
            stats.notes["html_truncated"] += 1
            html = html[: self.config.max_html_bytes]
        if self.watchdog is None:
            doc.text = html_to_text(html, self.config.main_content)
        else:
            text = self.watchdog.extract(html)
            if text is None:
                log.warning("%s (%s): extraction exceeded %.1fs, skipped", doc.id, doc.url, self.config.time_limit_s)
                stats.remove(doc, "extract:timeout")
                return None
            doc.text = text
        if not doc.text:
            stats.remove(doc, "extract:no_text")
            return None
        return doc

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
