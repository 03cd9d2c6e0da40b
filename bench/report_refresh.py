"""What a `pretrain report --serve` refresh costs on a long MoE run: the first build, a refresh after
a few steps are appended, a poll with nothing new; and the charts' JSON built as plain plotly dicts
(ours) vs through plotly.py's figure objects (`go.Figure(...).to_json()`, the peer), on the same
charts, paired and interleaved. A synthetic run dir in a temp dir.

    python bench/report_refresh.py [--steps 100000] [--layers 4] [--experts 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import plotly.graph_objects as go

from cluster.charts import figures_json
from cluster.report_server import LiveDashboard


def record(step: int, layers: int, experts: int) -> str:
    return json.dumps({"step": step, "tokens": 2048 * step, "loss": 3 + 1 / step, "lr": 1e-3, "grad_norm": 1.0,
                       "tokens_per_s": 4000.0, "mfu": 0.1, "aux_loss": 1.0, "z_loss": 0.1, "dropped_frac": 0.01,
                       "moe_layers": list(range(1, 2 * layers, 2)), "dropped_frac_per_layer": [0.01] * layers,
                       "expert_load": [[1 / experts] * experts] * layers,
                       "tokens_by_source": {"web": 1500 * step, "books": 548 * step}}) + "\n"


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        path = run / "metrics.jsonl"
        path.write_text("".join(record(s, args.layers, args.experts) for s in range(1, args.steps + 1)))
        print(f"{args.steps} steps, {args.layers} MoE layers x {args.experts} experts, "
              f"metrics.jsonl {path.stat().st_size / 1e6:.0f} MB")
        dashboard = LiveDashboard([run])
        cold, page = timed(dashboard.page_json)
        print(f"first build: {cold:.2f} s, page.json {len(page) / 1e6:.2f} MB")
        refresh = []
        for r in range(args.repeats):
            with open(path, "a") as f:
                f.writelines(record(args.steps + 10 * r + i, args.layers, args.experts) for i in range(1, 11))
            refresh.append(timed(dashboard.page_json)[0])
        idle = [timed(dashboard.page_json)[0] for _ in range(args.repeats)]
        print(f"refresh after 10 new steps: median {statistics.median(refresh):.3f} s "
              f"(min {min(refresh):.3f}, max {max(refresh):.3f})")
        print(f"poll, nothing new: median {1000 * statistics.median(idle):.1f} ms")
        figures = {i: c for i, c in dashboard.current()[1] if isinstance(c, dict)}
        ours, peer = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            ours.append(timed(lambda: figures_json(figures))[0])
            peer.append(timed(lambda: [go.Figure(f).to_json() for f in figures.values()])[0])
        ratios = sorted(p / o for p, o in zip(peer, ours))
        print(f"{len(figures)} charts' JSON: ours median {statistics.median(ours):.3f} s, plotly.py figures median "
              f"{statistics.median(peer):.3f} s; peer/ours median {statistics.median(ratios):.1f}x "
              f"(range {ratios[0]:.1f}-{ratios[-1]:.1f}x over {args.repeats} pairs)")


if __name__ == "__main__":
    main()
