"""Whole runs in this process (LocalExecutor) over small hand-made inputs."""
import json
import os

import pytest

from data_pipeline.errors import PipelineError
from data_pipeline.executors import LocalExecutor
from data_pipeline.report import check_counts
from data_pipeline.run import run_pipeline
from data_pipeline.shards import iter_samples
from shard_format import load_encoding
from data_pipeline.verify import verify
from tests.data_pipeline.conftest import html_page, prose, write_warc

WEB_FILTERS = {"url": {}, "gopher_quality": {"min_words": 20}, "fineweb": {}}


@pytest.fixture
def inputs(tmp_path):
    """Two crawl files sharing one page exactly and one nearly; a books dir with a duplicate book."""
    (tmp_path / "crawl").mkdir()
    (tmp_path / "books").mkdir()
    shared, near = prose(1), prose(2)
    write_warc(tmp_path / "crawl/a.warc.gz", [("http://a.org/1", html_page(shared)), ("http://a.org/2", html_page(near)),
                                             ("http://xvideos.com/x", html_page(prose(9)))])
    almost = near.replace("Sentence 2-7", "Phrase 2-7")
    write_warc(tmp_path / "crawl/b.warc.gz", [("http://b.org/1", html_page(shared)), ("http://b.org/2", html_page(almost)),
                                             ("http://b.org/3", html_page(prose(3)))])
    for name, seed in (("one", 4), ("two", 5), ("copy", 4)):
        (tmp_path / f"books/{name}.txt").write_text(prose(seed, 200))
    return tmp_path


def sources(root, **extra) -> list[dict]:
    return [{"name": "web", "weight": 0.7, "format": "warc", "inputs": [str(root / "crawl/*.warc.gz")],
             "filters": WEB_FILTERS, "extract": {"watchdog": False}},
            {"name": "books", "weight": 0.3, "format": "books", "inputs": [str(root / "books/*.txt")], **extra}]


def test_local_run_dedups_across_files_and_verifies(inputs, make_config, shared_data):
    out = inputs / "out"
    report, manifest = run_pipeline(make_config(sources(inputs)), out, LocalExecutor())
    web, books = report["sources"]["web"]["steps"], report["sources"]["books"]["steps"]
    assert web["extract"]["bytes_in"] > web["extract"]["bytes_out"] > 0  # HTML in, text out
    assert web["url"]["removed"] == {"url:blocked_domain": 1}
    assert web["dedup"]["removed"] == {"dedup:exact": 1, "dedup:near": 1}
    assert books["dedup"]["removed"] == {"dedup:exact": 1}
    assert check_counts(report) == []
    assert verify(out)[1] == []
    assert manifest["sources"] == {"web": {"weight": 0.7}, "books": {"weight": 0.3}}
    encoding = load_encoding(str(shared_data / "tokenizer/gpt2/r50k_base.tiktoken"))
    urls = []
    for entry in manifest["shards"]:
        for _, tokens, meta in iter_samples(out / entry["path"]):
            text = encoding.decode(tokens.tolist())
            assert encoding.encode_ordinary(text) == tokens.tolist()
            urls.append(meta.get("url") or meta["title"])
    assert urls[:2] == ["http://a.org/1", "http://a.org/2"] and "http://b.org/1" not in urls  # lowest key kept
    assert (out / "config.yaml").is_file() and not list(out.rglob("*.tmp"))


def test_rerun_reuses_finished_work_and_gives_identical_bytes(inputs, make_config):
    out = inputs / "out"
    config = make_config(sources(inputs))
    _, first = run_pipeline(config, out, LocalExecutor())
    task_stats = sorted(out.glob("_work/tasks/*/stats.json"))
    mtimes = [p.stat().st_mtime_ns for p in task_stats]
    manifest_bytes = (out / "manifest.json").read_bytes()
    run_pipeline(config, out, LocalExecutor())
    assert [p.stat().st_mtime_ns for p in task_stats] == mtimes
    assert (out / "manifest.json").read_bytes() == manifest_bytes


def test_missing_and_unreadable_inputs_fail_alone(inputs, make_config):
    """A file that is not a WARC fails its own task; the source's other inputs still make shards."""
    (inputs / "crawl" / "zz-not-a-warc.warc.gz").write_bytes(b"<html>an HTML page saved under the wrong name</html>")
    (inputs / "more").mkdir()
    (inputs / "more" / "a.txt").write_text("A short book of its own, with a few sentences in it. " * 40)
    config = make_config(sources(inputs) + [
        {"name": "more", "weight": 0.1, "format": "books",
         "inputs": [str(inputs / "more/*.txt"), str(inputs / "nowhere/*.txt")]}])
    report, manifest = run_pipeline(config, inputs / "out", LocalExecutor())
    failed = {f["path"]: f["error"] for f in report["failed_inputs"]}
    assert "no readable WARC or ARC record" in failed[str(inputs / "crawl/zz-not-a-warc.warc.gz")]
    assert str(inputs / "nowhere/*.txt") in failed
    assert {e["source"] for e in manifest["shards"]} == {"web", "books", "more"}
    assert verify(inputs / "out")[1] == []


def test_a_source_with_no_input_is_refused_before_anything_runs(inputs, make_config):
    config = make_config(sources(inputs) + [
        {"name": "gone", "weight": 0.1, "format": "jsonl", "inputs": [str(inputs / "nowhere/*.jsonl")]}])
    with pytest.raises(PipelineError, match=r"sources \['gone'\]: no input file found .*nowhere/\*\.jsonl"):
        run_pipeline(config, inputs / "out", LocalExecutor())
    assert not (inputs / "out").exists()


def test_a_source_none_of_whose_inputs_can_be_read_gets_no_manifest(inputs, make_config):
    (inputs / "wiki.xml.bz2").write_bytes(b"this is not bzip2")
    config = make_config(sources(inputs) + [
        {"name": "wiki", "weight": 0.1, "format": "wiki", "inputs": [str(inputs / "wiki.xml.bz2")]}])
    with pytest.raises(PipelineError, match=r"sources \['wiki'\]: none of their inputs could be read"):
        run_pipeline(config, inputs / "out", LocalExecutor())
    assert (inputs / "out" / "report.json").is_file() and not (inputs / "out" / "manifest.json").exists()


def test_unwritable_output_dir_is_a_clear_error(inputs, make_config):
    blocker = inputs / "file"
    blocker.write_text("")
    with pytest.raises(PipelineError, match="not writable"):
        run_pipeline(make_config(sources(inputs)), blocker / "out", LocalExecutor())
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = inputs / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PipelineError, match="not writable"):
            run_pipeline(make_config(sources(inputs)), locked, LocalExecutor())


def test_changed_config_starts_over(inputs, make_config):
    out = inputs / "out"
    run_pipeline(make_config(sources(inputs)), out, LocalExecutor())
    _, manifest = run_pipeline(make_config(sources(inputs), shards={"target_bytes": 1_000_000}), out, LocalExecutor())
    assert [e["path"] for e in manifest["shards"]] == ["web/shard-000000.tar", "books/shard-000000.tar"]
    assert sorted(p.name for p in (out / "books").iterdir()) == ["shard-000000.tar"]
    assert json.loads((out / "report.json").read_text())["failed_inputs"] == []


@pytest.mark.parametrize("hash_inputs", [False, True])
def test_an_input_changed_in_place_is_read_again(inputs, make_config, hash_inputs):
    """Same path, new content: a rerun must not reuse the stale results of the old file."""
    out, book = inputs / "out", sorted((inputs / "books").glob("*.txt"))[0]
    config = make_config(sources(inputs), hash_inputs=hash_inputs)
    _, before = run_pipeline(config, out, LocalExecutor())
    stat, data = book.stat(), book.read_bytes()
    if hash_inputs:  # the same size and modification time: only the content can tell
        book.write_bytes(b"z " * 1000 + data[2000:])
        os.utime(book, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        book.write_bytes(data + b"\n\nA new closing chapter, added after the first run." * 20)
    _, after = run_pipeline(config, out, LocalExecutor())
    tokens = lambda m: sum(e["tokens"] for e in m["shards"] if e["source"] == "books")  # noqa: E731
    assert tokens(after) != tokens(before)
