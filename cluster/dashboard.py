"""`pretrain report DIR`: one self-contained HTML page for a training run dir (metrics.jsonl) and/or
a data output dir (report.json). Charts are inline SVG (cluster/charts.py): the file opens
offline, from an email attachment or a laptop, with no script and no network."""
from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from cluster.charts import PALETTE, heatmap, line_chart, stacked_bars
from cluster.errors import ClusterError

# One colour per training chart (the report test finds each chart in a screenshot by its colour).
TRAIN_CHARTS = {  # key in metrics.jsonl: (title, colour)
    "loss": ("Loss", PALETTE[0]),
    "lr": ("Learning rate", PALETTE[1]),
    "tokens_per_s": ("Throughput (tokens/s)", PALETTE[2]),
    "mfu": ("Model FLOPs utilisation", PALETTE[3]),
    "grad_norm": ("Gradient norm (before clipping)", PALETTE[4]),
}
MOE_COLOURS = {"dropped_frac": PALETTE[5], "aux_loss": PALETTE[6], "z_loss": PALETTE[7]}
SOURCE_COLOURS = [PALETTE[8], "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896"]  # apart from the charts above
KEPT_COLOUR = "#54a24b"  # not in PALETTE: the kept share stays distinct from every reason
# Config keys whose values never go into a report (a key pasted into a config by mistake stays private).
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential)", re.IGNORECASE)

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.grid-charts{display:flex;flex-wrap:wrap;gap:12px} .chart{border:1px solid #e3e3e3}
.chart .title{font-weight:600;font-size:13px;fill:#222} .chart .tick{font-size:10px;fill:#555}
.chart .legend{font-size:11px} .chart .grid{stroke:#eee} .chart .plotarea{fill:none;stroke:#bbb}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left} .muted{color:#777}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:400px}
"""


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(records by step, lines that could not be parsed). A resumed run logs some steps again:
    the last record of a step wins, since it is the one the run continued from."""
    by_step: dict[int, dict] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            bad += 1  # e.g. the torn last line of a run that was killed mid-write
    return [by_step[s] for s in sorted(by_step)], bad


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def _series(records: list[dict], key: str) -> tuple[list[float], list[Optional[float]]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        xs.append(r["step"])
        ys.append(float(v) if isinstance(v, (int, float)) else None)
    return xs, ys


def training_section(run_dir: Path) -> str:
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return "<h2>Training</h2><p>metrics.jsonl has no records yet.</p>"
    charts = []
    for key, (title, colour) in TRAIN_CHARTS.items():
        charts.append(line_chart(title, [(key, *_series(records, key), colour)]))
    if any("tokens_by_source" in r for r in records):
        charts.append(source_share_chart(records))
    if any("expert_load" in r for r in records):
        charts += moe_charts(records)
    last = records[-1]
    summary = [("steps logged", len(records)), ("last step", last["step"]), ("tokens", f"{last.get('tokens', 0):,}"),
               ("last loss", _num(last.get("loss"))), ("mean tokens/s", _num(_mean(records, "tokens_per_s"))),
               ("mean MFU", _num(_mean(records, "mfu")))]
    if bad:
        summary.append(("unparsable lines skipped", bad))
    return ("<h2>Training</h2>" + _table(None, summary)
            + f'<div class="grid-charts">{"".join(charts)}</div>')


def source_share_chart(records: list[dict]) -> str:
    """Each source's share of the training tokens drawn so far: it should settle on its mixture weight."""
    mixed = [r for r in records if r.get("tokens_by_source")]
    names = sorted(mixed[-1]["tokens_by_source"])
    steps = [r["step"] for r in mixed]
    series = []
    for i, name in enumerate(names):
        shares = [r["tokens_by_source"].get(name, 0) / (sum(r["tokens_by_source"].values()) or 1) for r in mixed]
        series.append((name, steps, shares, SOURCE_COLOURS[i % len(SOURCE_COLOURS)]))
    return line_chart("Share of training tokens by source", series)


def moe_charts(records: list[dict]) -> list[str]:
    """Router losses and dropped tokens over time, and one expert-load heatmap per MoE layer."""
    moe = [r for r in records if "expert_load" in r]
    charts = [line_chart("Dropped-token fraction (over capacity)",
                         [("dropped_frac", *_series(moe, "dropped_frac"), MOE_COLOURS["dropped_frac"])]),
              line_chart("Router losses (unscaled)",
                         [(k, *_series(moe, k), MOE_COLOURS[k]) for k in ("aux_loss", "z_loss")])]
    layers = moe[-1].get("moe_layers") or list(range(len(moe[-1]["expert_load"])))
    steps = [r["step"] for r in moe]
    for i, layer in enumerate(layers):
        rows = [r["expert_load"][i] for r in moe if i < len(r["expert_load"])]
        charts.append(heatmap(f"Expert load, layer {layer} (fraction of tokens per expert)", steps, rows))
    return charts


def _mean(records: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def _num(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _table(header: Optional[list[str]], rows: list[tuple]) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def step_stats(report: dict) -> Iterator[tuple[str, str, dict]]:
    """(source, step, counters) from report.json: {"sources": {name: {"steps": {step: counters}}}}."""
    for source, entry in (report.get("sources") or {}).items():
        for step, stats in (entry.get("steps") or {}).items():
            yield source, step, stats


def data_section(data_dir: Path) -> str:
    try:
        report = json.loads((data_dir / "report.json").read_text())
    except (OSError, ValueError) as e:
        return f"<h2>Data</h2><p>report.json could not be read: {escape(str(e))}</p>"
    rows = list(step_stats(report))
    if not rows:
        return "<h2>Data</h2><p>report.json holds no per-step counts.</p>"
    sources = sorted({src for src, _, _ in rows})
    reasons = sorted({r for _, _, s in rows for r in s.get("removed", {})})
    by_source = {src: [s for x, _, s in rows if x == src] for src in sources}
    steps = list(dict.fromkeys(step for _, step, _ in rows))
    by_step = {st: [s for _, x, s in rows if x == st] for st in steps}
    charts = [  # a source keeps what its last step lets through; a step keeps what it passes on
        _removed_chart("Documents per source: kept and removed (by reason)", sources, reasons, by_source,
                       [by_source[src][-1].get("docs_out", 0) for src in sources]),
        _removed_chart("Documents per pipeline step: kept and removed (by reason)", steps, reasons, by_step,
                       [sum(s.get("docs_out", 0) for s in by_step[st]) for st in steps])]
    table = _table(["source", "step", "in", "out", "removed", "bytes in", "bytes out", "tokens", "seconds"],
                   [(src, step, s.get("docs_in", 0), s.get("docs_out", 0), sum(s.get("removed", {}).values()),
                     s.get("bytes_in", 0), s.get("bytes_out", 0), s.get("tokens", 0), s.get("seconds", 0))
                    for src, step, s in rows])
    failed = [(f.get("source", ""), f.get("path", ""), f.get("error", "")) for f in report.get("failed_inputs") or []]
    failed_html = f"<h3>Inputs that failed</h3>{_table(['source', 'input', 'error'], failed)}" if failed else ""
    return (f'<h2>Data: {escape(str(data_dir))}</h2><div class="grid-charts">{"".join(charts)}</div>'
            f"{table}{failed_html}")


def _removed_chart(title: str, labels: list[str], reasons: list[str], stats: dict[str, list[dict]],
                   kept: list[float]) -> str:
    parts = [("kept", [float(k) for k in kept], KEPT_COLOUR)]
    for j, reason in enumerate(reasons):
        colour = PALETTE[(j + 3) % len(PALETTE)]
        parts.append((reason, [float(sum(s.get("removed", {}).get(reason, 0) for s in stats[label]))
                               for label in labels], colour))
    return stacked_bars(title, labels, parts)


def _config_section(run_dir: Path) -> tuple[str, dict]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "", {}
    try:
        config = scrub(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return "<p>config.yaml could not be parsed.</p>", {}
    text = yaml.safe_dump(config, sort_keys=False)
    return f"<details><summary>Resolved config</summary><pre>{escape(text)}</pre></details>", config


def _data_dir_of(config: dict, run_dir: Path) -> Optional[Path]:
    """The training run's data output dir, when its report.json is there to show beside the run."""
    path = (config.get("data") or {}).get("path")
    if not isinstance(path, str):
        return None
    candidate = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    return candidate if (candidate / "report.json").is_file() else None


def build_report(directory: Path) -> str:
    has_run, has_data = (directory / "metrics.jsonl").is_file(), (directory / "report.json").is_file()
    if not has_run and not has_data:
        raise ClusterError(f"{directory}: neither a run dir (metrics.jsonl) nor a data output dir (report.json)")
    config_html, config = _config_section(directory)
    sections = []
    if has_run:
        sections.append(training_section(directory))
        data_dir = _data_dir_of(config, directory)
        if data_dir is not None:
            sections.append(data_section(data_dir))
    if has_data:
        sections.append(data_section(directory))
    name = (config.get("model") or {}).get("name", "") if isinstance(config.get("model"), dict) else ""
    title = f"pretrain report: {directory.resolve().name}" + (f" ({name})" if name else "")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f'<p class="muted">{escape(str(directory.resolve()))}</p>{config_html}{"".join(sections)}</body></html>')


def write_report(directory: str | Path, out: Optional[str | Path] = None) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise ClusterError(f"{directory}: not a directory")
    target = Path(out) if out else directory / "report.html"
    html = build_report(directory)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(html)
    tmp.replace(target)  # a viewer refreshing the page never sees half a file
    return target
