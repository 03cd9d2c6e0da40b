"""A model whose training state does not fit one process, trained on this CPU: GPT-3 XL-class
`configs/model/gpt3-760m.yaml` (about 12 GB of fp32 weights, gradients and Adam states) for 3 steps
at sequence 256, micro batch 1, on 2 processes with ZeRO-3 and activation checkpointing.

Prints each rank's measured peak memory (the trainer's RUN/logs/memory-rank*.json: the resident set
above the level before the model was built) beside `pretrain plan`'s estimate for the same layout, the
planner's figure for ZeRO-0 on the same 2 processes, the step times, and the time and peak memory of
`pretrain checkpoint consolidate` on the checkpoint the run saved.

    python bench/scale_cpu.py [--data DIR] [--out DIR] [--steps 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
MODEL = "configs/model/gpt3-760m.yaml"
TRAIN = {"seq_len": 256, "micro_batch_size": 1, "global_batch_size": 2, "precision": "fp32",
         "activation_checkpointing": True, "warmup_tokens": 512, "decay_tokens": 100_000}
# Run as a child: consolidating one checkpoint, timed, with the peak of its anonymous memory (sampled every
# millisecond) above the level after the imports. The rank files are read through memory maps: their pages
# are the kernel's file cache, reclaimable, and counted apart (the peak resident set, VmHWM).
CONSOLIDATE = """
import json, sys, threading, time
from pathlib import Path
from trainer.checkpoint import resolve
from trainer.weight_shards import consolidate
status = lambda f: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f + ":"))
base, peak, done = status("RssAnon"), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
Path("/proc/self/clear_refs").write_text("5")
start = time.perf_counter()
consolidate(resolve(sys.argv[1]), Path(sys.argv[2]))
seconds = time.perf_counter() - start
done.append(1)
print(json.dumps({"seconds": seconds, "peak_anon_bytes": max(peak[0], status("RssAnon")) - base,
                  "peak_rss_bytes": status("VmHWM") - base}))
"""


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env, check=True, **kw)


def data_dir(given: str | None, out: Path) -> Path:
    if given:
        return Path(given)
    demo = REPO / "runs" / "demo" / "data"
    if (demo / "manifest.json").is_file():
        return demo
    cli("data", "run", "configs/data/sample.yaml", "--out", str(out / "data"), stdout=subprocess.DEVNULL)
    return out / "data"


def planned(zero_stage: int) -> float:
    from cluster.configio import load_model_config
    from cluster.plan import Layout, estimate_memory

    layout = Layout(zero_stage, 1, 2, TRAIN["micro_batch_size"], 1, TRAIN["activation_checkpointing"])
    return estimate_memory(load_model_config(REPO / MODEL), layout, TRAIN["seq_len"], TRAIN["precision"]).total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a data output dir (default: runs/demo/data, else built from the sample)")
    parser.add_argument("--out", help="where the run goes (default: a temporary dir, removed afterwards)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-cpu-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        config = out / "gpt3-760m-cpu.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(REPO / MODEL), "data": {"path": str(data_dir(args.data, out))},
            "train": {**TRAIN, "max_steps": args.steps}, "parallel": {"zero_stage": 3},
            "checkpoint": {"interval": args.steps, "keep_last": 1}, "logging": {"wandb_mode": "disabled"}}))
        run = out / "run"
        start = time.perf_counter()
        cli("train", str(config), "--nproc", "2", "--run-dir", str(run))
        train_seconds = time.perf_counter() - start
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ranks = [json.loads((run / "logs" / f"memory-rank{r}.json").read_text()) for r in (0, 1)]
        child = subprocess.run([sys.executable, "-c", CONSOLIDATE, str(run), str(out / "model.safetensors")],
                               cwd=REPO, capture_output=True, text=True, check=True)
        consolidated = json.loads(child.stdout.strip().splitlines()[-1])
        result = {"plan_zero3_bytes": planned(3), "plan_zero0_bytes": planned(0),
                  "measured_peak_bytes": [r["peak_bytes"] for r in ranks],
                  "step_seconds": [m["tokens"] and round(m["batch_size"] * TRAIN["seq_len"] / m["tokens_per_s"], 2)
                                   for m in metrics],
                  "train_command_seconds": round(train_seconds, 1),
                  "consolidate_seconds": round(consolidated["seconds"], 1),
                  "consolidate_peak_anon_bytes": consolidated["peak_anon_bytes"],
                  "consolidate_peak_rss_bytes": consolidated["peak_rss_bytes"],
                  "consolidated_file_bytes": (out / "model.safetensors").stat().st_size}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    plan = result["plan_zero3_bytes"]
    print(f"gpt3-760m, seq {TRAIN['seq_len']}, micro batch 1, 2 processes, ZeRO-3, activation checkpointing, fp32")
    print(f"  plan per process: ZeRO-3 {plan / GB:.2f} GB; ZeRO-0 would need {result['plan_zero0_bytes'] / GB:.2f} GB")
    for rank, peak in enumerate(result["measured_peak_bytes"]):
        print(f"  rank {rank}: measured peak {peak / GB:.2f} GB, plan / measured {plan / peak:.3f}")
    print(f"  step seconds: {result['step_seconds']}  (whole `pretrain train`: {result['train_command_seconds']} s)")
    print(f"  consolidate: {result['consolidate_seconds']} s for a {result['consolidated_file_bytes'] / GB:.2f} GB "
          f"file; peak anonymous memory {result['consolidate_peak_anon_bytes'] / GB:.2f} GB, peak resident set "
          f"{result['consolidate_peak_rss_bytes'] / GB:.2f} GB (with the memory-mapped rank files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
