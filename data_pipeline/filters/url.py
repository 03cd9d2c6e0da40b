"""URL blocklist: a document goes when its host or any parent domain is listed."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from data_pipeline.document import Document
from data_pipeline.schema import Section
from data_pipeline.step import Filter

BUILTIN_BLOCKLIST = Path(__file__).with_name("blocklist.txt")


class UrlFilterConfig(Section):
    builtin_blocklist: bool = True
    domains: list[str] = []
    blocklist_file: str | None = None


def read_domains(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip().lower() for line in path.read_text().splitlines())
    return {line for line in lines if line}


class UrlBlocklist(Filter):
    name = "url"

    def __init__(self, config: UrlFilterConfig):
        self.domains = {d.lower() for d in config.domains}
        if config.builtin_blocklist:
            self.domains |= read_domains(BUILTIN_BLOCKLIST)
        if config.blocklist_file:
            self.domains |= read_domains(Path(config.blocklist_file))

    def reason(self, doc: Document) -> str | None:
        if not doc.url:
            return None
        host = (urlsplit(doc.url).hostname or "").lower()
        parts = host.split(".")
        if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
            return "blocked_domain"
        return None
