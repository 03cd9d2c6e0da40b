"""Fixtures for the data pipeline tests: tiny hand-made inputs, a config builder, and one
shared Ray run over ../shared/data for the end-to-end checks."""
from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from data_pipeline.config import PipelineConfig

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROSE = ("The old harbour town woke slowly under a grey sky, and the fishermen walked down to "
         "the boats with their nets over their shoulders. ")


def prose(seed: int, sentences: int = 30) -> str:
    """Distinct, filter-passing English prose: each document gets its own vocabulary mix."""
    words = ["river", "garden", "letter", "window", "mountain", "captain", "market", "winter",
             "lantern", "village", "teacher", "journey", "kitchen", "harvest", "forest", "bridge"]
    lines = []
    for i in range(sentences):
        a, b, c = (words[(seed * 7 + i * k) % len(words)] for k in (1, 3, 5))
        lines.append(f"Sentence {seed}-{i} tells how the {a} and the {b} met near the {c}, and that "
                     f"they have stayed together with the others of the town since then.")
    return "\n".join(lines)


def html_page(body_text: str, title: str = "Page") -> str:
    paragraphs = "".join(f"<p>{line}</p>" for line in body_text.splitlines())
    return f"<html><head><title>{title}</title></head><body><article>{paragraphs}</article></body></html>"


def write_warc(path: Path, pages: list[tuple[str, str]], gzip_records: bool = True) -> Path:
    """A WARC of HTML responses [(url, html)] with a request record before each."""
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=gzip_records)
        for url, html in pages:
            writer.write_record(writer.create_warc_record(url, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode()),
                                                          http_headers=headers))
    return path


def write_jsonl_gz(path: Path, texts: list[str]) -> Path:
    with gzip.open(path, "wt") as fh:
        for i, text in enumerate(texts):
            fh.write(f'{{"id": "doc{i}", "text": {text!r}}}\n'.replace("'", '"'))
    return path


@pytest.fixture
def make_config(shared_data: Path):
    """PipelineConfig for the given sources with the shared tokenizer and tiny shards."""
    def build(sources: list[dict], **overrides) -> PipelineConfig:
        data = {"tokenizer": {"path": str(shared_data / "tokenizer/gpt2/r50k_base.tiktoken")},
                "sources": sources, "shards": {"target_bytes": 20_000}}
        data.update(overrides)
        return PipelineConfig.model_validate(data)
    return build


@pytest.fixture(scope="session")
def sample_config_path(repo_root: Path) -> Path:
    return repo_root / "configs" / "data" / "sample.yaml"


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, sample_config_path: Path, shared_data: Path):
    """One in-process-Ray run of configs/data/sample.yaml over ../shared/data, shared by the
    end-to-end tests: (out_dir, report, manifest)."""
    from cluster.configio import load_config
    from data_pipeline.executors import RayExecutor
    from data_pipeline.run import run_pipeline

    config = load_config(sample_config_path, PipelineConfig)
    out = tmp_path_factory.mktemp("sample_run")
    executor = RayExecutor(num_cpus=2, show_progress=False)
    try:
        report, manifest = run_pipeline(config, out, executor, config_dir=sample_config_path.parent)
    finally:
        executor.close()
    return out, report, manifest
