"""The three stages of a data run, each a pure function of its inputs so that any task can be
rerun (after a crash, a kill -9, a Ray retry) and give the same bytes:

1. `process_input`, one task per input file: read -> extract -> filters -> decontaminate ->
   tokenize, then signatures. Results go to `_work/tasks/<index>/` (renamed into place when
   complete), so a rerun skips finished inputs.
2. `deduplicate`, global, in tasks that each hold one slice (`dedup.clusters`): scatter each
   input's signatures into partitions by band bucket, find duplicates per partition, then
   connected components over the links; the lowest document key of each cluster survives.
3. `plan_shards` per source, then `write_shard` per shard: surviving documents in input order,
   shards written in parallel at the boundaries one writer would have chosen.

Stages know nothing about executors: they get a `map_tasks(fn, items, *args, desc=)` (the
executor's `map`); no stage returns more than counters to the driver."""
from __future__ import annotations

import json
import logging
import math
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
from data_pipeline.dedup.clusters import linked_to_lowest, near_duplicates, scatter
from data_pipeline.dedup.minhash import MinHasher, exact_hash
from data_pipeline.document import Document, StepStats, file_index_of, make_key
from data_pipeline.errors import InputError
from data_pipeline.extract import ExtractHtml
from data_pipeline.filters import build_filters
from data_pipeline.readers import READERS
from data_pipeline.shards import ShardWriter, sample_bytes
from data_pipeline.step import Step, run_steps
from data_pipeline.tokenization import Tokenize
from shard_format import token_dtype

log = logging.getLogger(__name__)
TASKS_DIR = "tasks"
DEDUP_DIR = "dedup"
WORK_FORMAT = 2  # part of the rerun fingerprint: work left by a run with another layout is redone


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
    docs = 0
    try:
        docs = _process_into(task, config, tmp, stats)
        error = None
    except InputError as e:
        error = str(e)
    except Exception as e:  # a bug or an unforeseen input: fail this input, keep the run
        error = f"{task.path}: {type(e).__name__}: {e}"
        log.error("%s failed:\n%s", task.path, traceback.format_exc())
    result = {"index": task.index, "source": task.source, "path": task.path, "error": error, "docs": docs,
              "seconds": round(time.perf_counter() - started, 3),
              "stats": {name: s.to_json() for name, s in stats.items()}}
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return result
    (tmp / "stats.json").write_text(json.dumps(result))
    os.replace(tmp, final)
    return result


def _process_into(task: InputTask, config: PipelineConfig, out: Path, stats: dict[str, StepStats]) -> int:
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
    dtype = token_dtype(config.tokenizer.vocab_size)
    keys, hashes, signatures, n_tokens, sizes = [], [], [], [], []
    try:
        with open(out / "docs.jsonl", "w") as meta_file, open(out / "tokens.bin", "wb") as token_file:
            for doc in run_steps(docs, steps, stats):
                keys.append(doc.key)
                hashes.append(exact_hash(doc.text))
                signatures.append(hasher.signature(doc.text) if mh.enabled else np.zeros(0, np.uint32))
                meta = _doc_meta(doc)
                n_tokens.append(doc.tokens.size)
                sizes.append(sample_bytes(meta, source.name, doc.tokens.size, dtype))
                meta_file.write(json.dumps({"key": doc.key, **meta}) + "\n")
                token_file.write(doc.tokens.tobytes())
    finally:
        for step in steps:
            step.close()
    n_hashes = mh.bands * mh.rows if mh.enabled else 0
    np.savez(out / "sigs.npz", keys=np.array(keys, np.int64), hashes=np.array(hashes, np.uint64),
             minhash=np.array(signatures, np.uint32).reshape(len(keys), n_hashes),
             tokens=np.array(n_tokens, np.int64), sizes=np.array(sizes, np.int64))
    return len(keys)


def _count_read(docs, stats: StepStats):
    for doc in docs:
        stats.docs_out += 1
        stats.bytes_out += len(doc.text or doc.html or "")
        yield doc


def _doc_meta(doc: Document) -> dict:
    """What the shard's json member keeps of a document (besides its source and token count)."""
    meta = {"id": doc.id}
    if doc.url:
        meta["url"] = doc.url
    elif doc.title:
        meta["title"] = doc.title
    return meta


def _signatures(work: Path, index: int, *names: str) -> list[np.ndarray]:
    with np.load(task_dir(work, index) / "sigs.npz", allow_pickle=False) as data:
        return [data[name] for name in names]


def _write_dir(final: Path, arrays: dict[str, np.ndarray]) -> None:
    """`.npy` files a later task memory-maps; renamed into place whole, so a Ray retry of a
    finished task changes nothing."""
    if final.is_dir():
        return
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    os.replace(tmp, final)


def scatter_signatures(index: int, parts: int, config: PipelineConfig, work: Path) -> int:
    """Stage 2a for one input: its dedup entries, grouped by partition. Returns its document count."""
    keys, hashes, minhash = _signatures(work, index, "keys", "hashes", "minhash")
    mh = config.dedup.minhash
    entries = scatter(keys, hashes if config.dedup.exact else None, minhash, mh.bands, mh.rows, parts)
    _write_dir(work / DEDUP_DIR / "scatter" / f"{index:06d}", entries)
    return int(keys.size)


def dedup_partition(part: int, indices: list[int], work: Path) -> dict:
    """Stage 2b for one partition: its slice of every input's entries; exact duplicates and LSH
    edges (lowest key, other key) saved for stage 2c. Returns the partition's entry count."""
    gathered: dict[str, list[np.ndarray]] = {}
    for index in indices:
        folder = work / DEDUP_DIR / "scatter" / f"{index:06d}"
        for kind in ("exact", "near"):
            if not (folder / f"{kind}_ids.npy").is_file():
                continue
            lo, hi = np.load(folder / f"{kind}_offsets.npy")[[part, part + 1]]
            for field in ("ids", "keys"):
                gathered.setdefault(f"{kind}_{field}", []).append(
                    np.load(folder / f"{kind}_{field}.npy", mmap_mode="r")[lo:hi])
    merged = {name: np.concatenate(chunks) for name, chunks in gathered.items()}
    empty = np.zeros(0, np.int64)
    exact = linked_to_lowest(merged["exact_ids"], merged["exact_keys"])[1] if "exact_ids" in merged else empty
    lowest, other = linked_to_lowest(merged["near_ids"], merged["near_keys"]) if "near_ids" in merged else (empty, empty)
    _write_dir(work / DEDUP_DIR / "parts" / f"{part:06d}", {"exact": exact, "edges": np.stack([lowest, other], 1)})
    return {"part": part, "entries": int(sum(a.size for name, a in merged.items() if name.endswith("_keys")))}


def resolve_duplicates(_: int, parts: int, work: Path) -> dict[str, dict[int, int]]:
    """Stage 2c: connected components over every partition's edges; writes the keys to drop
    (`removed.npz`: exact, near; sorted) and returns their counts per input index and reason."""
    folders = [work / DEDUP_DIR / "parts" / f"{p:06d}" for p in range(parts)]
    exact = np.sort(np.concatenate([np.zeros(0, np.int64)] + [np.load(f / "exact.npy") for f in folders]))
    edges = np.concatenate([np.zeros((0, 2), np.int64)] + [np.load(f / "edges.npy") for f in folders])
    found = {"exact": exact, "near": near_duplicates(edges, exact)}
    np.savez(work / DEDUP_DIR / "removed.npz", **found)
    counts = {}
    for reason, keys in found.items():
        files, n = np.unique(file_index_of(keys), return_counts=True)
        counts[reason] = dict(zip(files.tolist(), n.tolist()))
    return counts


def dedup_partitions(config: PipelineConfig, docs: int) -> int:
    """Partitions enough that each holds about `dedup.partition_entries` entries (documents x bands)."""
    mh = config.dedup.minhash
    per_doc = int(config.dedup.exact) + (mh.bands if mh.enabled else 0)
    return max(1, math.ceil(docs * per_doc / config.dedup.partition_entries))


def deduplicate(config: PipelineConfig, work: Path, done: list[dict], map_tasks) -> dict[str, StepStats]:
    """Stage 2 over every finished input; per-source stats. The keys to drop land in
    `_work/dedup/removed.npz`, which the shard stage reads."""
    started = time.perf_counter()
    shutil.rmtree(work / DEDUP_DIR, ignore_errors=True)  # cheap to redo, and partitions depend on what finished
    index_source = {r["index"]: r["source"] for r in done}
    indices = sorted(index_source)
    parts = dedup_partitions(config, sum(r["docs"] for r in done))
    docs = map_tasks(scatter_signatures, indices, parts, config, work, desc="dedup: scatter")
    map_tasks(dedup_partition, list(range(parts)), indices, work, desc="dedup: partitions")
    [counts] = map_tasks(resolve_duplicates, [0], parts, work, desc="dedup: clusters")
    stats = {name: StepStats() for name in set(index_source.values())}
    for index, n in zip(indices, docs):
        stats[index_source[index]].docs_in += n
    for reason, per_file in counts.items():
        for index, n in per_file.items():
            stats[index_source[index]].removed[f"dedup:{reason}"] += n
    for s in stats.values():
        s.docs_out = s.docs_in - sum(s.removed.values())
        s.seconds = time.perf_counter() - started
    return stats


def _removed_keys(work: Path) -> np.ndarray:
    with np.load(work / DEDUP_DIR / "removed.npz") as data:
        return np.sort(np.concatenate([data["exact"], data["near"]]))


def _kept(work: Path, index: int, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept mask, tokens per document, sample bytes per document) of one input."""
    keys, tokens, sizes = _signatures(work, index, "keys", "tokens", "sizes")
    lo, hi = np.searchsorted(removed, [make_key(index, 0), make_key(index + 1, 0)])
    return ~np.isin(keys, removed[lo:hi]), tokens, sizes


def plan_shards(source: str, indices: list[int], config: PipelineConfig, work: Path, out_dir: Path) -> list[dict]:
    """Stage 3a for one source: each shard's first document (input index, line) and sample count,
    at the boundaries a single writer would choose (`ShardWriter` closes a shard after the sample
    that brings it to `target_bytes`), from the sample sizes stage 1 recorded."""
    for stale in list((out_dir / source).glob("shard-*.tar*")) if (out_dir / source).is_dir() else []:
        stale.unlink()
    target, removed = config.shards.target_bytes, _removed_keys(work)
    plans, fill, count, start = [], 0, 0, None
    for index in indices:
        kept, _, sizes = _kept(work, index, removed)
        lines = np.flatnonzero(kept)
        ends = np.cumsum(sizes[lines])
        done, base = 0, 0
        while done < lines.size:
            start = start or (index, int(lines[done]))
            last = int(np.searchsorted(ends, target - fill + base))  # the sample that fills the shard
            if last >= lines.size:
                fill, count = fill + int(ends[-1]) - base, count + lines.size - done
                break
            plans.append({"source": source, "shard": len(plans), "start": start, "samples": count + last - done + 1})
            base, fill, count, start, done = int(ends[last]), 0, 0, None, last + 1
    if count:
        plans.append({"source": source, "shard": len(plans), "start": start, "samples": count})
    return plans


def write_shard(plan: dict, indices: dict[str, list[int]], config: PipelineConfig, work: Path, out_dir: Path) -> dict:
    """Stage 3b: one planned shard, from its first document on."""
    source, (first_index, first_line), left = plan["source"], plan["start"], plan["samples"]
    writer = ShardWriter(out_dir, source, config.shards.target_bytes, first_shard=plan["shard"])
    dtype, removed = token_dtype(config.tokenizer.vocab_size), _removed_keys(work)
    for index in indices[source][indices[source].index(first_index):]:
        kept, tokens, _ = _kept(work, index, removed)
        if not left:
            break
        if not kept.any():
            continue
        offsets = np.concatenate([[0], np.cumsum(tokens)])
        token_file = np.memmap(task_dir(work, index) / "tokens.bin", dtype=dtype, mode="r")
        with open(task_dir(work, index) / "docs.jsonl") as fh:
            for line, text in enumerate(fh):
                if not left:
                    break
                if kept[line] and (index, line) >= (first_index, first_line):
                    meta = json.loads(text)
                    del meta["key"]
                    writer.add(meta, np.array(token_file[offsets[line]:offsets[line + 1]]))
                    left -= 1
    entries = writer.close()
    if left or len(entries) != 1:  # a bug, never an input: the plan and the writer disagree
        raise RuntimeError(f"{source} shard {plan['shard']}: planned {plan['samples']} samples in one shard, "
                           f"wrote {plan['samples'] - left} in {len(entries)}")
    return {"source": source, "shard": entries[0]}
