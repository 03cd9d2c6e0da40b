"""The three stages of a data run, each a pure function of its inputs so that any task can be
rerun (after a crash, a kill -9, a Ray retry) and give the same bytes:

1. `process_input`, one task per input file: read -> extract -> filters -> decontaminate ->
   tokenize, then signatures. Results go to `_work/tasks/<index>/` (renamed into place when
   complete), so a rerun skips finished inputs.
2. `deduplicate`, global: exact hashes and MinHash LSH band buckets (one task per band)
   over all signatures, connected components, keep the lowest document key per cluster.
3. `write_source_shards`, one task per source: surviving documents in input order into shards.

Stages know nothing about executors: `run.run_pipeline` maps them over tasks."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.config import PipelineConfig, SourceConfig
from data_pipeline.decontaminate import Decontaminate
from data_pipeline.dedup.clusters import find_duplicates
from data_pipeline.dedup.minhash import MinHasher, exact_hash
from data_pipeline.document import Document, StepStats, file_index_of
from data_pipeline.errors import InputError
from data_pipeline.extract import ExtractHtml
from data_pipeline.filters import build_filters
from data_pipeline.readers import READERS
from data_pipeline.shards import ShardWriter
from data_pipeline.step import Step, run_steps
from data_pipeline.tokenization import Tokenize
from shard_format import token_dtype

log = logging.getLogger(__name__)
TASKS_DIR = "tasks"


@dataclass(frozen=True)
class InputTask:
    index: int
    source: str
    path: str


def task_dir(work: Path, index: int) -> Path:
    return work / TASKS_DIR / f"{index:06d}"


def build_steps(source: SourceConfig, config: PipelineConfig) -> list[Step]:
    steps: list[Step] = [ExtractHtml(source.extract)] if source.format == "warc" else []
    steps += build_filters(source.filters, config.seed)
    if config.decontamination.eval_sets:
        steps.append(Decontaminate(config.decontamination))
    return steps + [Tokenize(config.tokenizer)]


def process_input(task: InputTask, config: PipelineConfig, work: Path) -> dict:
    """Stage 1 for one input file. Returns {"index", "source", "path", "error", "seconds", "stats"};
    never raises for bad input, so one unreadable file fails only its own task."""
    final = task_dir(work, task.index)
    if (final / "stats.json").is_file():
        return json.loads((final / "stats.json").read_text())
    started = time.perf_counter()
    tmp = work / TASKS_DIR / f".tmp-{task.index:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    stats: dict[str, StepStats] = {"read": StepStats()}
    try:
        _process_into(task, config, tmp, stats)
        error = None
    except InputError as e:
        error = str(e)
    except Exception as e:  # a bug or an unforeseen input: fail this input, keep the run
        error = f"{task.path}: {type(e).__name__}: {e}"
        log.error("%s failed:\n%s", task.path, traceback.format_exc())
    result = {"index": task.index, "source": task.source, "path": task.path, "error": error,
              "seconds": round(time.perf_counter() - started, 3),
              "stats": {name: s.to_json() for name, s in stats.items()}}
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return result
    (tmp / "stats.json").write_text(json.dumps(result))
    os.replace(tmp, final)
    return result


def _process_into(task: InputTask, config: PipelineConfig, out: Path, stats: dict[str, StepStats]) -> None:
    source = next(s for s in config.sources if s.name == task.source)
    reader = READERS[source.format]
    docs = reader(Path(task.path), source.name, task.index, stats["read"], max_doc_chars=source.max_doc_chars,
                  strip_gutenberg_boilerplate=source.strip_gutenberg, text_field=source.text_field,
                  id_field=source.id_field, url_field=source.url_field,
                  max_lines_without_text=source.max_lines_without_text)
    docs = _count_read(docs, stats["read"])
    steps = build_steps(source, config)
    mh = config.dedup.minhash
    hasher = MinHasher(mh.ngram, mh.bands, mh.rows, mh.seed)
    keys, hashes, signatures = [], [], []
    try:
        with open(out / "docs.jsonl", "w") as meta_file, open(out / "tokens.bin", "wb") as token_file:
            for doc in run_steps(docs, steps, stats):
                keys.append(doc.key)
                hashes.append(exact_hash(doc.text))
                signatures.append(hasher.signature(doc.text) if mh.enabled else np.zeros(0, np.uint32))
                meta_file.write(json.dumps(_doc_meta(doc)) + "\n")
                token_file.write(doc.tokens.tobytes())
    finally:
        for step in steps:
            step.close()
    n_hashes = mh.bands * mh.rows if mh.enabled else 0
    np.savez(out / "sigs.npz", keys=np.array(keys, np.int64), hashes=np.array(hashes, np.uint64),
             minhash=np.array(signatures, np.uint32).reshape(len(keys), n_hashes))


def _count_read(docs, stats: StepStats):
    for doc in docs:
        stats.docs_out += 1
        stats.bytes_out += len(doc.text or doc.html or "")
        yield doc


def _doc_meta(doc: Document) -> dict:
    meta = {"key": doc.key, "id": doc.id, "n": int(doc.tokens.size)}
    if doc.url:
        meta["url"] = doc.url
    elif doc.title:
        meta["title"] = doc.title
    return meta


def load_signatures(work: Path, indices: list[int]) -> dict[str, np.ndarray]:
    """All finished tasks' signatures, concatenated in key order."""
    parts = []
    for index in indices:
        with np.load(task_dir(work, index) / "sigs.npz", allow_pickle=False) as data:
            parts.append({k: data[k] for k in ("keys", "hashes", "minhash")})
    merged = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in ("keys", "hashes", "minhash")}
    order = np.argsort(merged["keys"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def deduplicate(config: PipelineConfig, work: Path, done: list[dict],
                map_bands) -> tuple[np.ndarray, dict[str, StepStats]]:
    """Stage 2: global dedup over every finished task's signatures; the removed keys and
    per-source stats. `map_bands(fn, [band arrays])` runs the per-band bucketing (e.g. as Ray tasks)."""
    started = time.perf_counter()
    index_source = {r["index"]: r["source"] for r in done}
    signatures = load_signatures(work, sorted(index_source))
    mh = config.dedup.minhash
    found = find_duplicates(signatures, mh.bands, mh.rows, config.dedup.exact, map_bands)
    stats = {name: StepStats() for name in set(index_source.values())}
    for key in signatures["keys"].tolist():
        stats[index_source[file_index_of(key)]].docs_in += 1
    for reason, keys in found.items():
        for key in keys.tolist():
            stats[index_source[file_index_of(key)]].removed[f"dedup:{reason}"] += 1
    for s in stats.values():
        s.docs_out = s.docs_in - sum(s.removed.values())
        s.seconds = time.perf_counter() - started
    return np.concatenate([found["exact"], found["near"]]), stats


def write_source_shards(source: str, indices: list[int], removed_keys: np.ndarray, config: PipelineConfig,
                        work: Path, out_dir: Path) -> dict:
    """Stage 3 for one source: its surviving documents, input order, into shards."""
    for stale in list((out_dir / source).glob("shard-*.tar*")) if (out_dir / source).is_dir() else []:
        stale.unlink()
    writer = ShardWriter(out_dir, source, config.shards.target_bytes)
    dtype = token_dtype(config.tokenizer.vocab_size)
    removed = set(removed_keys.tolist())
    for index in indices:
        folder = task_dir(work, index)
        tokens = np.fromfile(folder / "tokens.bin", dtype=dtype)
        offset = 0
        with open(folder / "docs.jsonl") as fh:
            for line in fh:
                meta = json.loads(line)
                n, key = meta.pop("n"), meta.pop("key")
                if key not in removed:
                    writer.add(meta, tokens[offset:offset + n])
                offset += n
    return {"source": source, "shards": writer.close()}
