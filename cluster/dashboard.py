"""`pretrain report DIR [DIR ...]`: one self-contained HTML page for training run dirs (metrics.jsonl)
and/or data output dirs (report.json). Several runs overlay on the same charts. Charts are plotly
(cluster/charts.py) with plotly.js inlined: the file opens offline, from an email attachment or a
laptop. A page is a list of blocks, each with a stable id, so `--serve` can refresh them in place."""
from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import yaml

from cluster.charts import PALETTE, draw_script, heatmap, line_chart, plotly_script, stacked_bars
from cluster.errors import ClusterError

Block = tuple[str, Union[str, dict]]  # (element id, HTML or chart)

# One colour per training chart when a single run is shown; with several runs, one colour per run.
TRAIN_CHARTS = {  # key in metrics.jsonl: (title, colour)
    "loss": ("Loss", PALETTE[0]),
    "lr": ("Learning rate", PALETTE[1]),
    "tokens_per_s": ("Throughput (tokens/s)", PALETTE[2]),
    "mfu": ("Model FLOPs utilisation", PALETTE[3]),
    "grad_norm": ("Gradient norm (before clipping)", PALETTE[4]),
}
MOE_COLOURS = {"dropped_frac": PALETTE[5], "aux_loss": PALETTE[6], "z_loss": PALETTE[7]}
SOURCE_COLOURS = [PALETTE[8], "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896"]  # apart from the charts above
MAX_POINTS = 2000  # per chart series; the summary table still reads every record
KEPT_COLOUR = "#54a24b"  # not in PALETTE: the kept share stays distinct from every reason
# Config keys whose values never go into a report (a key pasted into a config by mistake stays private).
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential)", re.IGNORECASE)

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.grid-charts{display:flex;flex-wrap:wrap;gap:12px} .chart{border:1px solid #e3e3e3}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left} .muted{color:#777}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:400px}
"""


class MetricsTail:
    """Reads metrics.jsonl, and on later calls only the lines appended since: a live dashboard of a
    long run re-parses nothing. A resumed run logs some steps again: the last record of a step wins,
    since it is the one the run continued from."""

    def __init__(self, path: Path):
        self.path, self.inode, self.offset = path, None, 0
        self.by_step: dict[int, dict] = {}
        self.bad = 0

    def _add(self, line: bytes, by_step: dict[int, dict]) -> int:
        """Adds the line's record; 1 if it could not be parsed (e.g. the torn last line of a killed run)."""
        if not line.strip():
            return 0
        try:
            record = json.loads(line.decode(errors="replace"))
            by_step[int(record["step"])] = record
            return 0
        except (ValueError, KeyError, TypeError):
            return 1

    def read(self) -> tuple[list[dict], int]:
        """(records by step, lines that could not be parsed)."""
        stat = self.path.stat()
        if stat.st_ino != self.inode or stat.st_size < self.offset:  # replaced or truncated: start over
            self.__init__(self.path)
            self.inode = stat.st_ino
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line without its newline yet may still be being written
        self.bad += sum(self._add(line, self.by_step) for line in chunk[:end].splitlines())
        self.offset += end
        by_step = dict(self.by_step)
        bad = self.bad + self._add(chunk[end:], by_step)
        return [by_step[s] for s in sorted(by_step)], bad


def read_metrics(path: Path) -> tuple[list[dict], int]:
    return MetricsTail(path).read()


def thin(records: list[dict], limit: int = MAX_POINTS) -> list[dict]:
    """Every k-th record and the last, at most about `limit`: a long run's charts stay light to draw."""
    if len(records) <= limit:
        return records
    step = -(-len(records) // limit)
    return records[:-1:step] + records[-1:]


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


def training_blocks(runs: list[tuple[str, list[dict], int]]) -> list[Block]:
    """The summary table (a row per run) and the training charts, every run overlaid on each."""
    rows = []
    for label, records, bad in runs:
        last = records[-1] if records else {}
        rows.append((label, len(records), last.get("step", "-"), f"{last.get('tokens', 0):,}",
                     _num(last.get("loss")), _num(_mean(records, "tokens_per_s")), _num(_mean(records, "mfu")), bad))
    header = ["run", "steps logged", "last step", "tokens", "last loss", "mean tokens/s", "mean MFU",
              "unparsable lines skipped"]
    blocks: list[Block] = [("training-summary", "<h2>Training</h2>" + _table(header, rows))]
    for key, (title, colour) in TRAIN_CHARTS.items():
        series = [(label if len(runs) > 1 else key, *_series(thin(records), key), colour if len(runs) == 1 else
                   PALETTE[i % len(PALETTE)]) for i, (label, records, _) in enumerate(runs)]
        blocks.append((f"train-{key}", line_chart(title, series)))
    return blocks


def run_detail_blocks(prefix: str, label: str, records: list[dict]) -> list[Block]:
    """What does not overlay: one run's token shares by source and its MoE routing."""
    blocks: list[Block] = []
    if any(r.get("tokens_by_source") for r in records):
        blocks.append((f"{prefix}-sources", source_share_chart(records)))
    if any("expert_load" in r for r in records):
        blocks += [(f"{prefix}-{name}", chart) for name, chart in moe_charts(records)]
    if blocks and label:
        blocks.insert(0, (f"{prefix}-heading", f"<h2>{escape(label)}: data mixture and routing</h2>"))
    return blocks


def source_share_chart(records: list[dict]) -> dict:
    """Each source's share of the training tokens drawn so far: it should settle on its mixture weight."""
    mixed = [r for r in records if r.get("tokens_by_source")]
    names = sorted(mixed[-1]["tokens_by_source"])
    steps = [r["step"] for r in mixed]
    series = []
    for i, name in enumerate(names):
        shares = [r["tokens_by_source"].get(name, 0) / (sum(r["tokens_by_source"].values()) or 1) for r in mixed]
        series.append((name, steps, shares, SOURCE_COLOURS[i % len(SOURCE_COLOURS)]))
    return line_chart("Share of training tokens by source", series)


def moe_charts(records: list[dict]) -> list[tuple[str, dict]]:
    """Router losses, dropped tokens (overall and per layer) over time, and one expert-load heatmap per MoE layer."""
    moe = [r for r in records if "expert_load" in r]
    layers = moe[-1].get("moe_layers") or list(range(len(moe[-1]["expert_load"])))
    steps = [r["step"] for r in moe]
    dropped = [("all layers", *_series(moe, "dropped_frac"), MOE_COLOURS["dropped_frac"])]
    if len(layers) > 1 and any("dropped_frac_per_layer" in r for r in moe):
        dropped += [(f"layer {layer}", steps, [_at(r.get("dropped_frac_per_layer"), i) for r in moe],
                     PALETTE[i % len(PALETTE)]) for i, layer in enumerate(layers)]
    charts = [("dropped", line_chart("Dropped-token fraction (over capacity)", dropped)),
              ("router-losses", line_chart("Router losses (unscaled)",
                                           [(k, *_series(moe, k), MOE_COLOURS[k]) for k in ("aux_loss", "z_loss")]))]
    for i, layer in enumerate(layers):
        rows = [r["expert_load"][i] for r in moe if i < len(r["expert_load"])]
        charts.append((f"load-layer{layer}", heatmap(f"Expert load, layer {layer} (fraction of tokens per expert)",
                                                     steps[:len(rows)], rows)))
    return charts


def _at(values: Optional[list], i: int) -> Optional[float]:
    return values[i] if isinstance(values, list) and i < len(values) else None


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


def data_blocks(prefix: str, data_dir: Path) -> list[Block]:
    heading = f"<h2>Data: {escape(str(data_dir))}</h2>"
    try:
        report = json.loads((data_dir / "report.json").read_text())
    except (OSError, ValueError) as e:
        return [(prefix, f"{heading}<p>report.json could not be read: {escape(str(e))}</p>")]
    rows = list(step_stats(report))
    if not rows:
        return [(prefix, f"{heading}<p>report.json holds no per-step counts.</p>")]
    sources = sorted({src for src, _, _ in rows})
    reasons = sorted({r for _, _, s in rows for r in s.get("removed", {})})
    by_source = {src: [s for x, _, s in rows if x == src] for src in sources}
    steps = list(dict.fromkeys(step for _, step, _ in rows))
    by_step = {st: [s for _, x, s in rows if x == st] for st in steps}
    table = _table(["source", "step", "in", "out", "removed", "bytes in", "bytes out", "tokens", "seconds"],
                   [(src, step, s.get("docs_in", 0), s.get("docs_out", 0), sum(s.get("removed", {}).values()),
                     s.get("bytes_in", 0), s.get("bytes_out", 0), s.get("tokens", 0), s.get("seconds", 0))
                    for src, step, s in rows])
    failed = [(f.get("source", ""), f.get("path", ""), f.get("error", "")) for f in report.get("failed_inputs") or []]
    failed_html = f"<h3>Inputs that failed</h3>{_table(['source', 'input', 'error'], failed)}" if failed else ""
    return [(prefix, heading),  # a source keeps what its last step lets through; a step keeps what it passes on
            (f"{prefix}-sources", _removed_chart("Documents per source: kept and removed (by reason)", sources,
                                                 reasons, by_source,
                                                 [by_source[src][-1].get("docs_out", 0) for src in sources])),
            (f"{prefix}-steps", _removed_chart("Documents per pipeline step: kept and removed (by reason)", steps,
                                               reasons, by_step,
                                               [sum(s.get("docs_out", 0) for s in by_step[st]) for st in steps])),
            (f"{prefix}-table", table + failed_html)]


def _removed_chart(title: str, labels: list[str], reasons: list[str], stats: dict[str, list[dict]],
                   kept: list[float]) -> dict:
    parts = [("kept", [float(k) for k in kept], KEPT_COLOUR)]
    for j, reason in enumerate(reasons):
        colour = PALETTE[(j + 3) % len(PALETTE)]
        parts.append((reason, [float(sum(s.get("removed", {}).get(reason, 0) for s in stats[label]))
                               for label in labels], colour))
    return stacked_bars(title, labels, parts)


def read_config(run_dir: Path, label: str) -> tuple[str, dict]:
    """(the resolved config as HTML, the config with secrets redacted)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "", {}
    try:
        config = scrub(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return "<p>config.yaml could not be parsed.</p>", {}
    text = yaml.safe_dump(config, sort_keys=False)
    return f"<details><summary>Resolved config{escape(label)}</summary><pre>{escape(text)}</pre></details>", config


def _data_dir_of(config: dict, run_dir: Path) -> Optional[Path]:
    """The training run's data output dir, when its report.json is there to show beside the run."""
    path = (config.get("data") or {}).get("path")
    if not isinstance(path, str):
        return None
    candidate = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    return candidate if (candidate / "report.json").is_file() else None


def run_labels(dirs: list[Path]) -> list[str]:
    """Directory names, or full paths where two runs share a name."""
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d.resolve()) for n, d in zip(names, dirs)]


def check_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        if not d.is_dir():
            raise ClusterError(f"{d}: not a directory")
        if not (d / "metrics.jsonl").is_file() and not (d / "report.json").is_file():
            raise ClusterError(f"{d}: neither a run dir (metrics.jsonl) nor a data output dir (report.json)")


def build_blocks(dirs: list[Path], read: Callable[[Path], tuple[list[dict], int]] = read_metrics
                 ) -> tuple[str, list[Block]]:
    """(page title, blocks) for run dirs and data dirs, in the order given; `read` reads a metrics.jsonl."""
    check_dirs(dirs)
    labels = run_labels(dirs)
    runs = [(label, d) for label, d in zip(labels, dirs) if (d / "metrics.jsonl").is_file()]
    data_dirs = [d for d in dirs if (d / "report.json").is_file()]
    blocks: list[Block] = []
    metrics = [(label, *read(d / "metrics.jsonl")) for label, d in runs]
    if runs:
        blocks += training_blocks(metrics)
    names = []
    for i, ((label, d), (_, records, _)) in enumerate(zip(runs, metrics)):
        config_html, config = read_config(d, f": {label}" if len(runs) > 1 else "")
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        names.append(model.get("name", ""))
        blocks += run_detail_blocks(f"run{i}", label if len(runs) > 1 else "", thin(records))
        if config_html:
            blocks.append((f"run{i}-config", config_html))
        data_dir = _data_dir_of(config, d)
        if data_dir is not None and data_dir.resolve() not in {x.resolve() for x in data_dirs}:
            data_dirs.append(data_dir)
    for k, d in enumerate(data_dirs):
        blocks += data_blocks(f"data{k}", d)
    shown = [f"{label} ({name})" if name else label for (label, _), name in zip(runs, names)]
    shown += [label for label, d in zip(labels, dirs) if not (d / "metrics.jsonl").is_file()]
    return "pretrain report: " + " vs ".join(shown), blocks


def render(title: str, subtitle_html: str, blocks: list[Block], live_script: str = "") -> str:
    """The page: each HTML block in its own element, runs of charts side by side in a grid."""
    body, grid = [], []
    for element_id, content in blocks + [("", "")]:
        if isinstance(content, dict):
            grid.append(f'<div class="chart"><div id="{element_id}" class="plot"></div></div>')
            continue
        if grid:
            body.append(f'<div class="grid-charts">{"".join(grid)}</div>')
            grid = []
        if element_id:
            body.append(f'<div id="{element_id}">{content}</div>')
    figures = {i: c for i, c in blocks if isinstance(c, dict)}
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style>{plotly_script()}</head><body><h1>{escape(title)}</h1>"
            f'<p class="muted">{subtitle_html}</p>{"".join(body)}{draw_script(figures)}{live_script}</body></html>')


def build_report(dirs: Union[Path, list[Path]]) -> str:
    dirs = [Path(d) for d in (dirs if isinstance(dirs, list) else [dirs])]
    title, blocks = build_blocks(dirs)
    return render(title, escape(", ".join(str(d.resolve()) for d in dirs)), blocks)


def default_out(dirs: list[Path]) -> Path:
    """DIR/report.html for one dir; for several, compare.html beside the first."""
    return dirs[0] / "report.html" if len(dirs) == 1 else dirs[0].resolve().parent / "compare.html"


def write_report(dirs: Union[str, Path, list], out: Optional[str | Path] = None) -> Path:
    dirs = [Path(d) for d in (dirs if isinstance(dirs, list) else [dirs])]
    check_dirs(dirs)
    target = Path(out) if out else default_out(dirs)
    html = build_report(dirs)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(html)
    tmp.replace(target)  # a viewer refreshing the page never sees half a file
    return target
