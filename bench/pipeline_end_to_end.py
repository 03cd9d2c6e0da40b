"""End-to-end benchmark: `pretrain data run` (local Ray, and --local) against datatrove's
equivalent pipeline on the same >= 200 MB WARC, interleaved, in one run.

    .venv/bin/python bench/pipeline_end_to_end.py [--warc-dir DIR] [--mb 200] [--repeats 2] [--json OUT]

The WARC is built by `bench/warc_corpus.py` into --warc-dir unless a corpus of that size is
there. Each variant runs as a subprocess, and its CPU time is that of every process it started
(the CLI, Ray's workers and daemons, extraction children, datatrove's sandboxes; see CpuMeter).
Variants:

- `ray1` / `ray2`: `pretrain data run` on a fresh local Ray with ray.num_cpus=1 / 2 (each run
  starts and stops Ray's daemons: a fixed cost of interpreters starting up);
- `rayup`: `pretrain data run --address` joining a local one-CPU cluster that the benchmark started
  once with `ray start --head` (as on any real Ray deployment, where the cluster outlives the job).
  Its CPU time is the CLI's plus everything the cluster's processes (daemons and the job's workers)
  used while the job ran, from the cluster's own cgroup;
- `local`: `pretrain data run --local`;
- `datatrove`: WarcReader -> resiliparse in datatrove's extractor sandbox (the extraction ours
  does) -> LanguageFilter (the same lid.176.ftz) -> GopherRepetition -> GopherQuality -> C4 ->
  FineWeb -> JsonlWriter, then its 4-stage MinHash (signatures, 14 bucket tasks, clusters,
  filter -> JsonlWriter), LocalPipelineExecutor with workers=1;
- `trafilatura`: the same with datatrove's own extractor, Trafilatura.

Ours also tokenizes (tiktoken) and hashes for exact dedup; datatrove's side does neither.
Keep/remove agreement is per input record, matched by URL (the corpus gives each a distinct one):
ours keeps what its shards hold, datatrove what its final JSONL holds."""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from importlib.util import find_spec
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.warc_corpus import build_corpus  # noqa: E402

STEPS = ["extract", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]


def our_config(data: Path, warc_dir: Path) -> dict:
    filters = {"language": {"model_path": str(data / "langid/lid.176.ftz"), "languages": ["en"]},
               "gopher_repetition": {}, "gopher_quality": {}, "c4": {}, "fineweb": {}}
    return {"seed": 0, "tokenizer": {"path": str(data / "tokenizer/gpt2/r50k_base.tiktoken")},
            "sources": [{"name": "web", "weight": 1.0, "format": "warc", "inputs": [str(warc_dir / "*.warc.gz")],
                         "extract": {"time_limit_s": 5.0}, "filters": filters}],
            "dedup": {"exact": True, "minhash": {"ngram": 5, "bands": 14, "rows": 8}}}


class RunFailed(Exception):
    """A variant's subprocess exited non-zero."""


def measured(cmd: list[str], log: Path) -> dict:
    """Wall and CPU seconds (user + system) of one subprocess and every process it started; fails
    on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    meter = CpuMeter()
    wall = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=meter.enter)
        cpu = meter.wait(proc)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return {"wall_s": wall, "cpu_s": cpu, "cpu_method": meter.method}


class CpuMeter:
    """CPU seconds of a process tree. RUSAGE_CHILDREN would miss Ray's workers (raylet ignores
    SIGCHLD, so their time is never passed up), so: a cgroup's CPU account (exact, every process
    the child starts; needs root and cgroup v1's cpuacct or cgroup v2), else each descendant's
    own CPU time polled every 0.1 s (misses up to 0.1 s per process, and short-lived processes)."""

    def __init__(self):
        v1, v2 = Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup")
        root = v1 if (v1 / "cpuacct.usage").is_file() else v2 if (v2 / "cgroup.controllers").is_file() else None
        self.group = root / f"pretrain-bench-{os.getpid()}-{time.monotonic_ns()}" if root else None
        try:
            self.group.mkdir()
            self.method = "cgroup"
        except (AttributeError, OSError):
            self.group, self.method = None, "poll"

    def enter(self) -> None:
        """Runs in the child before exec: join the cgroup, so every descendant is in it too."""
        if self.group is not None:
            (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> float:
        """CPU seconds of every process that ever joined the group (cgroup only)."""
        usage = self.group / "cpuacct.usage"
        return int(usage.read_text()) / 1e9 if usage.is_file() else \
            int((self.group / "cpu.stat").read_text().split()[1]) / 1e6  # usage_usec

    def kill_all(self) -> None:
        for pid in (self.group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def wait(self, proc: subprocess.Popen) -> float:
        seen: dict[tuple[int, float], float] = {}
        while proc.poll() is None:
            if self.group is None:
                self._sample(proc.pid, seen)
            time.sleep(0.1)
        if self.group is None:
            return sum(seen.values())
        deadline = time.monotonic() + 60  # Ray's daemons exit a moment after the CLI does
        while (self.group / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill_all()  # only processes this run started are in the group
        cpu = self.usage()
        self.group.rmdir()
        return cpu

    @staticmethod
    def _sample(pid: int, seen: dict) -> None:
        try:
            tree = [psutil.Process(pid)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            return
        for p in tree:
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    seen[(p.pid, p.create_time())] = times.user + times.system
            except psutil.Error:
                pass


class RayCluster:
    """A local one-CPU Ray cluster (`ray start --head`) in a cgroup of its own, so that the CPU its
    daemons and the jobs' workers use while a job runs can be read off; restarted if something killed it."""

    def __init__(self, num_cpus: int = 1):
        self.num_cpus, self.meter, self.address = num_cpus, None, None

    def ensure(self) -> str:
        if self.meter is not None and (self.meter.group / "cgroup.procs").read_text().split():
            return self.address
        self.stop()
        self.meter = CpuMeter()
        if self.meter.group is None:
            raise SystemExit("the rayup variant needs a cgroup (root) to account the cluster's CPU")
        from ray.util import get_node_ip_address

        from trainer.distributed import free_port

        port, client_port = free_port(), free_port()
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
               f"--ray-client-server-port={client_port}", f"--num-cpus={self.num_cpus}", "--include-dashboard=false",
               "--disable-usage-stats"]
        for attempt in range(3):  # on a loaded machine the GCS sometimes misses ray start's deadline
            started = subprocess.run(cmd, env=env, preexec_fn=self.meter.enter, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            if started.returncode == 0:
                break
            self.meter.kill_all()
            time.sleep(10)
        else:
            raise RunFailed(f"`ray start --head` failed 3 times (exit {started.returncode})")
        time.sleep(5)  # let the daemons finish starting before any job is measured
        self.address = f"{get_node_ip_address()}:{port}"
        return self.address

    def usage(self) -> float:
        return self.meter.usage()

    def stop(self) -> None:
        if self.meter is not None:
            self.meter.kill_all()
            time.sleep(1)
            with contextlib.suppress(OSError):
                self.meter.group.rmdir()
            self.meter = None
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` left our address for bare ray.init() calls
        with contextlib.suppress(OSError):
            if self.address and current.read_text().strip() == self.address:
                current.unlink()


CLUSTER = RayCluster()


def run_ours(variant: str, config: Path, out: Path) -> tuple[dict, set[str], dict]:
    cmd = [sys.executable, "-m", "cluster.cli", "data", "run", str(config), "--out", str(out)]
    if variant == "rayup":
        cmd += ["--address", CLUSTER.ensure()]
        cluster_before = CLUSTER.usage()
        timing = measured(cmd, out.with_suffix(".log"))
        time.sleep(2)  # the job's workers exit just after its driver
        timing["cluster_cpu_s"] = CLUSTER.usage() - cluster_before
        timing["cpu_s"] += timing["cluster_cpu_s"]
    else:
        cmd += ["--local"] if variant == "local" else ["--set", f"ray.num_cpus={variant.removeprefix('ray')}"]
        timing = measured(cmd, out.with_suffix(".log"))
    kept = set()
    for shard in sorted(out.glob("web/shard-*.tar")):
        with tarfile.open(shard) as tar:
            kept |= {json.load(tar.extractfile(m))["url"] for m in tar.getmembers() if m.name.endswith(".json")}
    steps = json.loads((out / "report.json").read_text())["sources"]["web"]["steps"]
    removed = {name: sum(s["removed"].values()) for name, s in steps.items() if name != "shards"}
    return timing, kept, removed


def run_datatrove(variant: str, data: Path, warc_dir: Path, out: Path) -> tuple[dict, set[str], dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--datatrove-worker", variant,
           "--data", str(data), "--warc-dir", str(warc_dir), "--out", str(out)]
    timing = measured(cmd, out.with_suffix(".log"))
    kept = set()
    for path in sorted((out / "final").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as fh:
            kept |= {json.loads(line)["metadata"]["url"] for line in fh}
    return timing, kept, json.loads((out / "removed.json").read_text())


def datatrove_worker(extractor_name: str, data: Path, warc_dir: Path, out: Path) -> None:
    """The datatrove pipeline in this process (the parent measures its CPU time)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    from bench.pipeline_throughput import datatrove_language_filter

    language = datatrove_language_filter(data)
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    filtered, sigs, buckets, remove = (str(out / d) for d in ("filtered", "sigs", "buckets", "remove"))
    stages = [
        ([WarcReader(str(warc_dir), glob_pattern="*.warc.gz"), make_extractor(extractor_name), language,
          GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(),
          JsonlWriter(filtered)], 1),
        ([JsonlReader(filtered), MinhashDedupSignature(sigs, config=config)], 1),
        ([MinhashDedupBuckets(sigs, buckets, config=config)], config.num_buckets),
        ([MinhashDedupCluster(buckets, remove, config=config)], 1),
        ([JsonlReader(filtered), MinhashDedupFilter(remove), JsonlWriter(str(out / "final"))], 1),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(out / f"logs{i}")).run()
    (out / "removed.json").write_text(json.dumps(dropped_per_step([out / "logs0/stats.json", out / "logs4/stats.json"])))


def dropped_per_step(stats_files: list[Path]) -> dict[str, int]:
    """Documents each datatrove extractor, filter and dedup step dropped, named like our report's steps."""
    steps = [s for f in stats_files for s in json.loads(f.read_text())
             if s["name"].split(":")[0].endswith(("EXTRAC", "FILTER", "DEDUP"))]
    return {name: s["stats"].get("total", 0) - s["stats"].get("forwarded", 0)
            for name, s in zip(STEPS + ["dedup"], steps)}


def make_extractor(name: str):
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.extractors.base import BaseExtractor

    from data_pipeline.extract import html_to_text

    class Resiliparse(BaseExtractor):
        """resiliparse with our options, in datatrove's sandbox process (its timeout handling)."""
        name = "🛢 resiliparse"

        def __init__(self):
            super().__init__(timeout=5.0)

        def extract(self, text: str) -> str:
            return html_to_text(text, main_content=True)

    return Resiliparse() if name == "datatrove" else Trafilatura(timeout=5.0)


def agreement(records: list[str], ours: set[str], theirs: set[str]) -> dict:
    only_ours, only_theirs = sorted(ours - theirs), sorted(theirs - ours)
    return {"same_decision": round(1 - (len(only_ours) + len(only_theirs)) / len(records), 5),
            "kept_by_ours": len(ours), "kept_by_datatrove": len(theirs),
            "kept_only_by_ours": len(only_ours), "kept_only_by_datatrove": len(only_theirs),
            "examples": {"kept_only_by_ours": only_ours[:20], "kept_only_by_datatrove": only_theirs[:20]}}


def record_urls(warc_dir: Path) -> list[str]:
    from data_pipeline.document import StepStats
    from data_pipeline.readers.web import iter_warc_records

    return [r.rec_headers.get_header("WARC-Target-URI") for path in sorted(warc_dir.glob("*.warc.gz"))
            for _, r, _ in iter_warc_records(path, StepStats())]


def spread(values: list[float], digits: int = 2) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def summarize(runs: list[dict], corpus: dict, kept: dict[str, set[str]], records: list[str]) -> dict:
    docs, mb = corpus["records"], corpus["html_bytes"] / 1e6
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    table = {v: {"docs_per_cpu_s": spread([docs / r["cpu_s"] for r in rs], 1),
                 "MB_per_cpu_s": spread([mb / r["cpu_s"] for r in rs], 3),
                 "cpu_s": spread([r["cpu_s"] for r in rs], 1), "wall_s": spread([r["wall_s"] for r in rs], 1),
                 "failed_attempts": sum(r["failed_attempts"] for r in rs), "removed": rs[0]["removed"]}
             for v, rs in by.items()}
    rep_of = {(r["variant"], r["rep"]): r for r in runs}

    def paired(a: str, b: str, f) -> list[float]:
        """f(run of a, run of b) for each repetition that has both."""
        return [f(rep_of[a, i], rep_of[b, i]) for i in sorted({r["rep"] for r in runs})
                if (a, i) in rep_of and (b, i) in rep_of]

    result = {"corpus": corpus, "variants": table, "ratio_docs_per_cpu_s_vs_datatrove": {}, "agreement": {}}
    for ours in ("ray1", "rayup", "local", "ray2"):
        ratios = paired(ours, "datatrove", lambda o, d: d["cpu_s"] / o["cpu_s"])
        if ratios:
            result["ratio_docs_per_cpu_s_vs_datatrove"][ours] = spread(ratios)
    for ray_variant, key in (("ray1", "ray_overhead"), ("rayup", "ray_overhead_running_cluster")):
        if by.get(ray_variant) and by.get("local"):
            result[key] = {
                "wall": spread(paired(ray_variant, "local", lambda r, lo: (r["wall_s"] - lo["wall_s"]) / r["wall_s"]), 3),
                "cpu": spread(paired(ray_variant, "local", lambda r, lo: (r["cpu_s"] - lo["cpu_s"]) / r["cpu_s"]), 3)}
    if by.get("ray2") and by.get("ray1"):
        result["ray2_wall_speedup_vs_ray1"] = spread(paired("ray2", "ray1", lambda r2, r1: r1["wall_s"] / r2["wall_s"]))
    reference = next((kept[v] for v in ("local", "ray1", "rayup", "ray2") if v in kept), None)
    for peer in ("datatrove", "trafilatura"):
        if reference is not None and peer in kept:
            result["agreement"][f"ours_vs_{peer}"] = agreement(records, reference, kept[peer])
    ours_sets = [kept[v] for v in ("local", "ray1", "rayup", "ray2") if v in kept]
    result["agreement"]["ours_identical_across_executors_and_runs"] = all(s == ours_sets[0] for s in ours_sets)
    result["runs"] = [{k: v for k, v in r.items() if k != "removed"} for r in runs]
    return result


def run_variant(variant: str, data: Path, warc_dir: Path, config: Path, out: Path):
    """(timing, kept URLs, removed per step), or None after failing: on a shared machine another
    user's test teardown may kill every Ray process, so a failed Ray run is retried from scratch a
    little later, up to 5 times; `failed_attempts` says how often that happened."""
    for attempt in range(5 if variant.startswith("ray") else 1):
        shutil.rmtree(out, ignore_errors=True)
        try:
            if variant in ("datatrove", "trafilatura"):
                timing, urls, removed = run_datatrove(variant, data, warc_dir, out)
            else:
                timing, urls, removed = run_ours(variant, config, out)
            shutil.rmtree(out)
            return {**timing, "failed_attempts": attempt}, urls, removed
        except RunFailed as e:
            print(f"{variant}: {e}", file=sys.stderr, flush=True)
            time.sleep(30)
    return None


def corpus_at(warc_dir: Path, data: Path, mb: float, files: int) -> dict:
    info = warc_dir / "corpus.json"
    if info.is_file() and json.loads(info.read_text())["html_bytes"] >= mb * 1e6:
        return json.loads(info.read_text())
    shutil.rmtree(warc_dir, ignore_errors=True)
    return build_corpus(data, warc_dir, mb, files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--warc-dir", default="/tmp/pretrain-bench-warc", help="where the corpus is (or is built)")
    parser.add_argument("--mb", type=float, default=200, help="HTML payload of the corpus, MB")
    parser.add_argument("--files", type=int, default=4, help="WARC files the corpus is split into")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="ray1,rayup,local,datatrove", help="run every repetition, order rotated")
    parser.add_argument("--once", default="ray2", help="run in the first repetition only (also: trafilatura)")
    parser.add_argument("--work", default="/tmp/pretrain-bench-e2e", help="scratch dir for outputs")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--datatrove-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data, warc_dir, work = Path(args.data).resolve(), Path(args.warc_dir).resolve(), Path(args.work).resolve()
    if args.datatrove_worker:
        return datatrove_worker(args.datatrove_worker, data, warc_dir, Path(args.out))
    if {"datatrove", "trafilatura"} & set(f"{args.variants},{args.once}".split(",")) and not find_spec("datatrove"):
        raise SystemExit("datatrove is not installed: pip install -e '.[bench]'")
    corpus = corpus_at(warc_dir, data, args.mb, args.files)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(our_config(data, warc_dir), sort_keys=False))
    repeated, once = args.variants.split(","), [v for v in args.once.split(",") if v]
    runs, kept = [], {}
    for rep in range(args.repeats):
        order = repeated[rep % len(repeated):] + repeated[:rep % len(repeated)] + (once if rep == 0 else [])
        for variant in order:
            result = run_variant(variant, data, warc_dir, config, work / f"{variant}-{rep}")
            if result is None:
                print(f"rep {rep} {variant}: gave up", file=sys.stderr, flush=True)
                continue
            timing, urls, removed = result
            runs.append({"variant": variant, "rep": rep, **timing, "removed": removed})
            kept.setdefault(variant, urls)
            if kept[variant] != urls:
                raise SystemExit(f"{variant}: kept documents changed between repetitions")
            print(f"rep {rep} {variant}: wall {timing['wall_s']:.1f}s cpu {timing['cpu_s']:.1f}s kept {len(urls)}",
                  file=sys.stderr, flush=True)
    CLUSTER.stop()
    figures = summarize(runs, corpus, kept, record_urls(warc_dir))
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
