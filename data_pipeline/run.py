"""`pretrain data run`: plan the inputs, run the three stages (see `stages`) on an executor,
write the report and, last and atomically, the manifest. Rerunning the same command finishes
only what is missing; the result is byte-identical to an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from data_pipeline.config import PipelineConfig, path_bases, resolve_glob, resolve_paths
from data_pipeline.document import StepStats
from data_pipeline.errors import PipelineError
from data_pipeline.report import build_report, write_report
from data_pipeline.stages import WORK_FORMAT, InputTask, deduplicate, plan_shards, process_input, write_shard
from data_pipeline.tokenization import tokenizer_record
from shard_format import MANIFEST_NAME, Manifest, ShardRecord, atomic_write, make_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)
WORK = "_work"


def plan_inputs(config: PipelineConfig, config_dir: Path | None) -> tuple[list[InputTask], list[dict]]:
    """One task per input file, numbered in (source order, sorted path) order; globs that match
    nothing come back as failures so the rest of the run still goes ahead."""
    tasks, failed, seen = [], [], set()
    bases = path_bases(config_dir)
    for source in config.sources:
        for pattern in source.inputs:
            files = resolve_glob(pattern, bases)
            if not files:
                failed.append({"source": source.name, "path": pattern,
                               "error": f"no input matches {pattern!r} (looked in {', '.join(map(str, bases))})"})
            for path in files:
                if path not in seen:
                    seen.add(path)
                    tasks.append(InputTask(len(tasks), source.name, str(path)))
    return tasks, failed


def prepare_output(out_dir: Path, config: PipelineConfig, tasks: list[InputTask]) -> Path:
    """Check the dir is writable, save the resolved config, and drop work left by a run with a
    different config or inputs (it could not be reused byte-for-byte)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"{out_dir}: output directory is not writable ({e.strerror})") from None
    resolved = config.model_dump(mode="json")
    inputs = [input_identity(Path(t.path), config.hash_inputs) for t in tasks]
    fingerprint = hashlib.sha256(json.dumps([WORK_FORMAT, resolved, inputs], sort_keys=True).encode()).hexdigest()
    work = out_dir / WORK
    marker = work / "fingerprint"
    if marker.is_file() and marker.read_text() != fingerprint:
        log.warning("%s: config or inputs changed since the last run; starting over", out_dir)
        shutil.rmtree(work)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    for leftover in (work / "tasks").glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    marker.write_text(fingerprint)
    atomic_write(out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return work


def input_identity(path: Path, by_content: bool) -> list:
    """What says an input is the same file as last run: path, size and modification time (and sha256)."""
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns] + ([sha256_file(path)] if by_content else [])


def run_pipeline(config: PipelineConfig, out_dir: Path, executor,
                 config_dir: Path | None = None) -> tuple[dict, Manifest]:
    """(report, manifest). Input failures are in report["failed_inputs"]; the manifest covers
    the inputs that succeeded."""
    started = time.perf_counter()
    config = resolve_paths(config, config_dir)
    tokenizer = tokenizer_record(config.tokenizer)
    tasks, failed = plan_inputs(config, config_dir)
    missing = [s.name for s in config.sources if not any(t.source == s.name for t in tasks)]
    if missing:
        raise PipelineError(f"sources {missing}: no input file found ("
                            f"{'; '.join(f['error'] for f in failed if f['source'] in missing)}); nothing was run")
    work = prepare_output(out_dir, config, tasks)
    results = executor.map(process_input, tasks, config, work, desc="inputs")
    failed += [{"source": r["source"], "path": r["path"], "error": r["error"]} for r in results if r["error"]]
    done = [r for r in results if not r["error"]]
    unread = [s.name for s in config.sources if not any(r["source"] == s.name for r in done)]
    dedup_stats = deduplicate(config, work, done, executor.map)
    by_source = _by_source(done)
    plans = executor.map(_plan_source, [s.name for s in config.sources], by_source, config, work, out_dir,
                         desc="shards: plan")
    written = executor.map(write_shard, [p for source_plans in plans for p in source_plans], by_source, config,
                           work, out_dir, desc="shards")
    shard_results = [{"source": s.name, "shards": [w["shard"] for w in written if w["source"] == s.name]}
                     for s in config.sources]
    shard_stats = {r["source"]: _shard_stats(r["shards"]) for r in shard_results}
    report = build_report(results, dedup_stats, shard_stats, failed, time.perf_counter() - started)
    write_report(out_dir, report)
    if unread:  # a manifest without a source's data would train on a different mixture: none at all
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        raise PipelineError(f"sources {unread}: none of their inputs could be read (failed_inputs in "
                            f"{out_dir / 'report.json'}); no manifest written")
    manifest = make_manifest(tokenizer, {s.name: s.weight for s in config.sources},
                             [entry for r in shard_results for entry in r["shards"]])
    write_manifest(out_dir, manifest)
    return report, manifest


def _by_source(done: list[dict]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for r in sorted(done, key=lambda r: r["index"]):
        grouped.setdefault(r["source"], []).append(r["index"])
    return grouped


def _plan_source(source: str, indices: dict[str, list[int]], config: PipelineConfig, work: Path,
                 out_dir: Path) -> list[dict]:
    return plan_shards(source, indices.get(source, []), config, work, out_dir)


def _shard_stats(shards: list[ShardRecord]) -> StepStats:
    samples = sum(s["samples"] for s in shards)
    return StepStats(docs_in=samples, docs_out=samples, bytes_out=sum(s["bytes"] for s in shards),
                     tokens=sum(s["tokens"] for s in shards))
