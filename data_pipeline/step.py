"""One step abstraction: documents in, documents out, counters recorded. Steps chain as
generators, so a task holds one document at a time, not a file's worth of text."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from data_pipeline.document import Document, StepStats, Timer

log = logging.getLogger(__name__)


class Step:
    """Subclasses implement `process`; `run` wraps it with the in/out/bytes/time counters."""

    name = "step"

    def process(self, doc: Document, stats: StepStats) -> Document | None:
        """Return the (possibly changed) document, or None after `stats.remove(doc, reason)`."""
        raise NotImplementedError

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            stats.docs_in += 1
            stats.bytes_in += len(doc.html) if doc.html is not None else len(doc.text)  # before extraction: its HTML
            with Timer(stats):
                result = self.process(doc, stats)
            if result is not None:
                stats.docs_out += 1
                stats.bytes_out += len(result.text)
                yield result

    def close(self) -> None:
        """Release processes or files the step holds; called when its task ends."""


class Filter(Step):
    """A step that keeps or removes a document unchanged; `reason` names why it goes."""

    def reason(self, doc: Document) -> str | None:
        raise NotImplementedError

    def process(self, doc: Document, stats: StepStats) -> Document | None:
        why = self.reason(doc)
        if why is None:
            return doc
        stats.remove(doc, f"{self.name}:{why}")
        return None


def run_steps(docs: Iterable[Document], steps: list[Step], stats: dict[str, StepStats]) -> Iterator[Document]:
    """Chain the steps lazily; `stats` gets one StepStats per step name, in pipeline order."""
    for step in steps:
        docs = step.run(docs, stats.setdefault(step.name, StepStats()))
    return docs
