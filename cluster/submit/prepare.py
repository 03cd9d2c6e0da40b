"""Prepares a run dir once, before any rank of a multi-node job starts: validates the config for
the job's real world size (batch arithmetic, expert parallelism) and saves the resolved config as
RUN/config.yaml through the trainer's own `prepare_run_dir`. Every rank then runs
`python -m trainer.main RUN`, as torchrun's ranks do for `pretrain train --nproc N`; preparing
once also means no rank reads config.yaml while another is writing it.

    python -m cluster.submit.prepare CONFIG RUN_DIR --world N [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def prepare(config: str, run_dir: str, world: int, overrides: list[str] = ()) -> Path:
    from cluster.configio import load_run_config
    from trainer.launch import prepare_run_dir

    return prepare_run_dir(load_run_config(config, list(overrides)), Path(run_dir), world)


def main(argv: list[str] | None = None) -> int:
    from cluster.cli import user_errors

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--world", type=int, required=True, help="total ranks of the job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        prepare(args.config, args.run_dir, args.world, args.overrides)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
