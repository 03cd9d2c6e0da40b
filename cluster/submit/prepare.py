"""Prepares a multi-node job's run dir once, before any rank starts: lays the user's train YAML out
for the job's real world size and saves it as RUN/config.yaml (`trainer.launch.prepare_run_dir`, as
`pretrain train` does), so no rank reads the config while another writes it. Every rank then runs
`python -m trainer.main RUN_DIR`.

    python -m cluster.submit.prepare CONFIG RUN_DIR --world N [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.config import JobConfig


def prepare(config: str, run_dir: str, world: int, overrides: list[str] = ()) -> JobConfig:
    """Returns the job's config as the user wrote it (the run dir holds it laid out for `world`)."""
    from cluster.configio import load_run_config
    from trainer.launch import prepare_run_dir

    job = load_run_config(config, list(overrides))
    prepare_run_dir(job, Path(run_dir), world)
    return job


def main(argv: list[str] | None = None) -> int:
    from cluster.errors import USER_ERRORS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--world", type=int, required=True, help="total ranks of the job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        prepare(args.config, args.run_dir, args.world, args.overrides)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
