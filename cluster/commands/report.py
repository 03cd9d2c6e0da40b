"""`pretrain report DIR [--out FILE]`: one self-contained HTML dashboard of a training run dir
(loss, learning rate, tokens/s, MFU, gradient norm; for MoE, expert load per layer over time and
dropped tokens) and/or of a data output dir (documents kept and removed per source and step)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML dashboard of a run dir or a data output dir",
                       description=__doc__)
    p.add_argument("directory", help="a run dir (RUN/metrics.jsonl) or a data output dir (DIR/report.json)")
    p.add_argument("--out", help="where to write the HTML (default: DIR/report.html)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from cluster.dashboard import write_report

    print(f"dashboard: {write_report(args.directory, args.out).resolve()}")
    return 0
