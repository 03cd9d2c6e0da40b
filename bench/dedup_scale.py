"""Dedup at scale: synthetic MinHash signatures with planted near-duplicate clusters of known sizes,
through the dedup stage (`data_pipeline.stages.deduplicate`, local Ray), beside the previous
implementation (every signature in the driver, one process) on the same signatures.

For each corpus size it prints: the driver's peak resident set (and the part the dedup added
above the driver's level after starting Ray), the largest Ray worker's, the wall time, and
whether the removed keys equal the previous implementation's and the planted clusters'.

    python bench/dedup_scale.py [--docs 500000 1000000 2000000] [--cpus 2] [--json OUT]

Each measurement runs in its own child process, so peaks do not carry over."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DOCS_PER_INPUT = 50_000
BANDS, ROWS = 14, 8
CLUSTER_SIZES = (2, 3, 5, 10)
PLANTED_FRACTION = 0.1  # of documents are members of a planted cluster
MB = 1 << 20


def generate(work: Path, docs: int) -> None:
    """Random signatures (unrelated documents never share a band) and clusters whose members keep two of
    the base's bands and redraw the rest; every fifth cluster also holds an exact copy of its base."""
    from data_pipeline.document import make_key
    from data_pipeline.stages import task_dir

    rng = np.random.default_rng(docs)
    keys = np.array([make_key(i // DOCS_PER_INPUT, i % DOCS_PER_INPUT) for i in range(docs)], np.int64)
    minhash = rng.integers(0, 2**32, (docs, BANDS * ROWS), dtype=np.uint32)
    hashes = rng.integers(0, 2**63, docs, dtype=np.uint64)
    members = rng.permutation(docs)[:int(docs * PLANTED_FRACTION)]
    clusters, at = [], 0
    while True:
        size = CLUSTER_SIZES[len(clusters) % len(CLUSTER_SIZES)]
        if at + size > members.size:
            break
        group, at = members[at:at + size], at + size
        for member in group[1:]:
            kept = rng.choice(BANDS, 2, replace=False)
            for band in kept:
                minhash[member, band * ROWS:(band + 1) * ROWS] = minhash[group[0], band * ROWS:(band + 1) * ROWS]
        if len(clusters) % 5 == 0:
            minhash[group[1]], hashes[group[1]] = minhash[group[0]], hashes[group[0]]
        clusters.append(np.sort(keys[group]))
    for index in range(-(-docs // DOCS_PER_INPUT)):
        part = slice(index * DOCS_PER_INPUT, (index + 1) * DOCS_PER_INPUT)
        folder = task_dir(work, index)
        folder.mkdir(parents=True)
        np.savez(folder / "sigs.npz", keys=keys[part], hashes=hashes[part], minhash=minhash[part])
    planted = np.sort(np.concatenate([c[1:] for c in clusters]))  # every member but the lowest key
    np.save(work / "planted.npy", planted)
    (work / "done.json").write_text(json.dumps(
        [{"index": i, "source": "web", "docs": min(DOCS_PER_INPUT, docs - i * DOCS_PER_INPUT)}
         for i in range(-(-docs // DOCS_PER_INPUT))]))


class PeakWorkerRss(threading.Thread):
    """The largest resident set of any Ray worker process, sampled every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        import psutil

        while not self.stop.wait(0.05):
            for proc in psutil.process_iter(["name", "memory_info"]):
                if (proc.info["name"] or "").startswith("ray::") and proc.info["memory_info"]:
                    self.peak = max(self.peak, proc.info["memory_info"].rss)


def run_ours(work: Path, cpus: int) -> dict:
    from data_pipeline.config import PipelineConfig
    from data_pipeline.executors import RayExecutor
    from data_pipeline.stages import DEDUP_DIR, deduplicate

    config = PipelineConfig.model_validate({"sources": [{"name": "web", "format": "warc", "inputs": ["x"],
                                                         "weight": 1.0}]})
    executor = RayExecutor(num_cpus=cpus, show_progress=False)
    done = json.loads((work / "done.json").read_text())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = PeakWorkerRss()
    sampler.start()
    started = time.perf_counter()
    deduplicate(config, work, done, executor.map)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    executor.close()
    with np.load(work / DEDUP_DIR / "removed.npz") as found:
        np.save(work / "ours.npy", np.sort(np.concatenate([found["exact"], found["near"]])))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "driver_peak_mb": peak / MB, "driver_added_mb": (peak - before) / MB,
            "worker_peak_mb": sampler.peak / MB,
            "partitions": len(list((work / DEDUP_DIR / "parts").iterdir()))}


# The implementation this replaced (data_pipeline/dedup/clusters.py and stages.load_signatures at
# commit 30bf43b), kept here as the reference the issue compares against.
def previous_find_duplicates(work: Path) -> np.ndarray:
    from data_pipeline.dedup.clusters import components
    from data_pipeline.stages import task_dir

    indices = [r["index"] for r in json.loads((work / "done.json").read_text())]
    parts = []
    for index in indices:
        with np.load(task_dir(work, index) / "sigs.npz") as data:
            parts.append({k: data[k] for k in ("keys", "hashes", "minhash")})
    merged = {k: np.concatenate([p[k] for p in parts]) for k in ("keys", "hashes", "minhash")}
    order = np.argsort(merged["keys"], kind="stable")
    keys, hashes, minhash = (merged[k][order] for k in ("keys", "hashes", "minhash"))
    order = np.lexsort((keys, hashes))
    dropped = np.zeros(keys.size, bool)
    dropped[order[1:]] = hashes[order[1:]] == hashes[order[:-1]]
    alive = np.flatnonzero(~dropped)
    edges = [np.zeros((0, 2), np.int64)]
    for b in range(BANDS):
        band = np.ascontiguousarray(minhash[alive, b * ROWS:(b + 1) * ROWS])
        _, bucket = np.unique(band, axis=0, return_inverse=True)
        bucket = bucket.ravel()
        order = np.lexsort((np.arange(bucket.size), bucket))
        sorted_bucket = bucket[order]
        starts = np.concatenate([[True], sorted_bucket[1:] != sorted_bucket[:-1]])
        first = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
        edges.append(np.stack([first[~starts], order[~starts]], axis=1).astype(np.int64))
    roots = components(alive.size, np.concatenate(edges))
    near = alive[roots != np.arange(alive.size)]
    return np.sort(np.concatenate([keys[dropped], keys[near]]))


def run_previous(work: Path) -> dict:
    started = time.perf_counter()
    np.save(work / "previous.npy", previous_find_duplicates(work))
    return {"seconds": time.perf_counter() - started,
            "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB}


def child(mode: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(docs: int, cpus: int, root: Path) -> dict:
    work = root / f"docs-{docs}"
    child("generate", str(work), str(docs))
    ours, previous = child("ours", str(work), str(cpus)), child("previous", str(work))
    found, reference, planted = (np.load(work / f"{n}.npy") for n in ("ours", "previous", "planted"))
    return {"docs": docs, "ours": ours, "previous": previous, "removed": int(found.size),
            "same_as_previous": bool(np.array_equal(found, reference)),
            "same_as_planted": bool(np.array_equal(found, planted))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, work, *rest = args.child
        if mode == "generate":
            generate(Path(work), int(rest[0]))
            print("{}")
        else:
            print(json.dumps(run_ours(Path(work), int(rest[0])) if mode == "ours" else run_previous(Path(work))))
        return
    results = []
    print(f"{'documents':>10} {'partitions':>10} {'driver peak MB':>15} {'dedup added MB':>15} {'worker peak MB':>15} "
          f"{'seconds':>8} | {'previous peak MB':>16} {'seconds':>8} | {'removed':>8} same as previous / planted")
    with tempfile.TemporaryDirectory(prefix="dedup-scale-") as root:
        for docs in args.docs:
            r = measure(docs, args.cpus, Path(root))
            results.append(r)
            o, p = r["ours"], r["previous"]
            print(f"{docs:>10,} {o['partitions']:>10} {o['driver_peak_mb']:>15.0f} {o['driver_added_mb']:>15.0f} "
                  f"{o['worker_peak_mb']:>15.0f} {o['seconds']:>8.1f} | {p['driver_peak_mb']:>16.0f} {p['seconds']:>8.1f} | "
                  f"{r['removed']:>8,} {r['same_as_previous']} / {r['same_as_planted']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
