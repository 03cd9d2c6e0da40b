"""report.json (per source and step: in, out, removed by reason, bytes, tokens, seconds) and
the human-readable summaries of `data run` and `data stats`."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_pipeline.document import StepStats
from data_pipeline.errors import PipelineError
from shard_format import atomic_write

REPORT = "report.json"


def build_report(task_results: list[dict], dedup_stats: dict[str, StepStats], shard_stats: dict[str, StepStats],
                 failed: list[dict], seconds: float) -> dict:
    sources: dict[str, dict] = {}
    for result in sorted(task_results, key=lambda r: r["index"]):
        entry = sources.setdefault(result["source"], {"inputs": [], "steps": {}})
        entry["inputs"].append({"path": result["path"], "seconds": result["seconds"], "error": result["error"]})
        for name, data in result["stats"].items():
            merged = entry["steps"].setdefault(name, StepStats())
            merged.merge(StepStats.from_json(data))
    for name, entry in sources.items():
        for step, stats in (("dedup", dedup_stats.get(name)), ("shards", shard_stats.get(name))):
            if stats is not None:
                entry["steps"][step] = stats
        entry["steps"] = {step: s.to_json() for step, s in entry["steps"].items()}
    return {"sources": sources, "failed_inputs": failed, "seconds": round(seconds, 2),
            "decontamination": decontamination_summary(sources)}


def decontamination_summary(sources: dict) -> dict[str, dict[str, int]]:
    """Per eval set, all sources together: documents cut, documents dropped, colliding 13-grams."""
    out: dict[str, dict[str, int]] = {}
    for entry in sources.values():
        step = entry["steps"].get("decontaminate")
        if step is None:
            continue
        for key, n in step["notes"].items():
            kind, _, eval_set = key.partition("_")
            if kind in ("cut", "ngrams"):
                out.setdefault(eval_set, {"cut": 0, "dropped": 0, "ngrams": 0})[kind] += n
        for reason, n in step["removed"].items():
            eval_set = reason.split(":", 1)[1].removesuffix("_short")
            out.setdefault(eval_set, {"cut": 0, "dropped": 0, "ngrams": 0})["dropped"] += n
    return out


def write_report(out_dir: Path, report: dict) -> None:
    atomic_write(out_dir / REPORT, json.dumps(report, indent=1) + "\n")


def load_report(out_dir: Path) -> dict:
    path = out_dir / REPORT
    if not path.is_file():
        raise PipelineError(f"{path}: no report (is {out_dir} a finished data run?)")
    return json.loads(path.read_text())


def summary_table(report: dict) -> Table:
    table = Table(title="data run: documents per source and step")
    for column in ("source", "step", "in", "out", "removed (top reasons)", "MB out", "tokens", "s"):
        table.add_column(column, justify="left" if column in ("source", "step", "removed (top reasons)") else "right")
    for source, entry in report["sources"].items():
        for step, s in entry["steps"].items():
            reasons = sorted(s["removed"].items(), key=lambda kv: -kv[1])[:3]
            table.add_row(source, step, str(s["docs_in"]), str(s["docs_out"]),
                          ", ".join(f"{r.split(':', 1)[-1]} {n}" for r, n in reasons), f"{s['bytes_out'] / 1e6:.2f}",
                          str(s["tokens"] or ""), f"{s['seconds']:.1f}")
    return table


def print_summary(report: dict, manifest: dict | None, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 120))
    console.print(summary_table(report))
    if manifest is not None:
        shards = manifest["shards"]
        console.print(f"{len(shards)} shards, {sum(s['samples'] for s in shards)} documents, "
                      f"{sum(s['tokens'] for s in shards)} tokens, {sum(s['bytes'] for s in shards) / 1e6:.1f} MB "
                      f"in {report['seconds']:.1f}s")
    for eval_set, c in report.get("decontamination", {}).items():
        console.print(f"decontamination against {eval_set}: {c['ngrams']} colliding 13-grams, {c['cut']} documents "
                      f"cut, {c['dropped']} dropped")
    for failure in report["failed_inputs"]:
        console.print(f"[red]failed input[/red] {failure['path']}: {failure['error']}")


def check_counts(report: dict) -> list[str]:
    """Lines naming every step whose in != out + removed (empty when the books balance)."""
    problems = []
    for source, entry in report["sources"].items():
        for step, s in entry["steps"].items():
            if s["docs_in"] + s["notes"].get("split_pieces", 0) != s["docs_out"] + sum(s["removed"].values()):
                problems.append(f"{source}/{step}: in {s['docs_in']} != out {s['docs_out']} + removed")
    return problems
