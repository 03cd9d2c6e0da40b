"""`pretrain report DIR [DIR ...] [--out FILE] [--serve [--port P]]`: one self-contained HTML
dashboard of training run dirs (loss, learning rate, tokens/s, MFU, gradient norm; for MoE, expert
load per layer over time and dropped tokens) and/or data output dirs (documents kept and removed per
source and step). Several run dirs overlay on the same charts. `--serve` serves the dashboard on
127.0.0.1 and refreshes its charts as metrics.jsonl grows."""
from __future__ import annotations

import argparse

DEFAULT_PORT = 8050


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="an HTML dashboard of run dirs and data output dirs (--serve: live)",
                       description=__doc__)
    p.add_argument("directories", nargs="+", metavar="DIR",
                   help="run dirs (RUN/metrics.jsonl) and/or data output dirs (DIR/report.json)")
    p.add_argument("--out", help="where to write the HTML (default: DIR/report.html; several dirs: "
                                 "compare.html beside the first)")
    p.add_argument("--serve", action="store_true", help="serve the dashboard on 127.0.0.1 and refresh it live")
    p.add_argument("--port", type=int, help=f"port for --serve (default {DEFAULT_PORT}; 0: any free)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from cluster.errors import ClusterError

    if args.serve and args.out:
        raise ClusterError("--out writes a file and --serve serves the page: pass one of them")
    if args.port is not None and not args.serve:
        raise ClusterError("--port is the port for --serve: add --serve, or drop --port")
    if args.serve:
        from cluster.report_server import serve

        serve(args.directories, DEFAULT_PORT if args.port is None else args.port)
        return 0
    from cluster.dashboard import write_report

    print(f"dashboard: {write_report(args.directories, args.out).resolve()}")
    return 0
