"""Training throughput on this machine, ours vs a peer, same run, same batches.

- `pretrain train` end to end (DeepSpeed engine, our loader, metrics) for tiny GPT (dense attention, so
  GPT-2 can express it), tiny GPT as configured (alternating attention) and tiny Switch: median tokens/s
  and MFU over the steady-state steps of metrics.jsonl.
- Hugging Face `GPT2LMHeadModel` of the same shape trained by a plain PyTorch loop (AdamW, clip 1.0) on
  the very batches our loader yields, its steps interleaved with our full training step in one process.
- Our data loader alone: tokens/s it delivers, against what a training step consumes (target >= 20x).

    python bench/train_step.py [--data DIR] [--steps 40] [--out bench-train.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.config import ModelConfig  # noqa: E402
from trainer.data import CausalLM, TrainLoader, load_manifest  # noqa: E402
from trainer.model.counting import flops_per_token  # noqa: E402

SEQ, MICRO = 64, 8
COMMON = [f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO}",
          "train.precision=fp32", "parallel.zero_stage=0", "parallel.ep_size=1", "checkpoint.interval=100000",
          "logging.wandb_mode=disabled", "train.warmup_tokens=1000"]
CASES = {"tiny-gpt (dense attention)": ("configs/train/tiny-gpt-cpu.yaml", ["model.attention=dense"]),
         "tiny-gpt (alternating)": ("configs/train/tiny-gpt-cpu.yaml", []),
         "tiny-switch": ("configs/train/tiny-switch-cpu.yaml", [])}


def ensure_data(path: str | None, workdir: Path) -> Path:
    """The demo's shards if present, else the test fixture's shard builder over ../shared/data."""
    if path and (Path(path) / "manifest.json").is_file():
        return Path(path)
    from tests.conftest import SHARED_DATA
    from tests.trainer.conftest import book_documents, gpt2_encoding, wiki_documents, write_shards

    enc = gpt2_encoding(SHARED_DATA)
    sources = {"books": [enc.encode_ordinary(d) for d in book_documents(SHARED_DATA, 600)],
               "wiki": [enc.encode_ordinary(d) for d in wiki_documents(SHARED_DATA, 100)]}
    out = workdir / "data"
    (out).mkdir()
    (out / "manifest.json").write_text(json.dumps(write_shards(out, sources, {"books": 4, "wiki": 2})))
    return out


def steady(values: list[float]) -> float:
    return statistics.median(values[len(values) // 4:])  # drop the warm-up quarter


def run_ours(config: str, extra: list[str], data: Path, steps: int, workdir: Path) -> dict:
    run_dir = workdir / f"run-{len(list(workdir.iterdir()))}"
    sets = [*COMMON, *extra, f"train.max_steps={steps}", f"data.path={data}"]
    cmd = [sys.executable, "-m", "cluster.cli", "train", config, "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": steady([r["tokens_per_s"] for r in records]), "mfu": steady([r["mfu"] for r in records]),
            "final_loss": records[-1]["loss"], "wall_s_incl_startup": round(wall, 1)}


def batches(data: Path, n: int) -> list[torch.Tensor]:
    loader = TrainLoader(load_manifest(data, 50257), CausalLM(SEQ), MICRO, 0, 1, 1234, 2.0, "error", 0)
    return [loader.next() for _ in range(n)]


def hf_step_fn(model_cfg: ModelConfig):
    """The peer: GPT2LMHeadModel + torch AdamW (GPT-3 betas, wd 0.1) + clip 1.0, nothing else."""
    from transformers import GPT2LMHeadModel

    from trainer.model.hf import hf_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(model_cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(b: torch.Tensor) -> float:
        loss = model(input_ids=b[:, :-1], labels=b[:, :-1].clone()).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_interleaved(data: Path, steps: int, workdir: Path) -> dict:
    """Our full training step (loader, DeepSpeed ZeRO-0 engine, metrics reduction) and the HF loop's step
    alternate in one process on the same batches, so load from other processes hits both alike."""
    from cluster.configio import load_run_config
    from trainer.distributed import init_distributed, shutdown_distributed
    from trainer.launch import prepare_run_dir
    from trainer.main import Trainer
    from trainer.malloc import keep_freed_memory

    sets = [*COMMON, "model.attention=dense", f"train.max_steps={steps}", f"data.path={data}"]
    cfg = load_run_config(REPO / "configs/train/tiny-gpt-cpu.yaml", sets)
    run_dir = prepare_run_dir(cfg, workdir / "interleaved", 1)
    init_distributed()
    keep_freed_memory()  # as trainer.main.train does on CPU; the HF loop in this process gets it too
    trainer = Trainer(cfg, run_dir)
    hf_step, same_batches = hf_step_fn(cfg.model), batches(data, steps)
    ours, hf = [], []
    for b in same_batches:
        t0 = time.perf_counter()
        trainer.train_step()
        t1 = time.perf_counter()
        hf_step(b)
        ours.append(b[:, :-1].numel() / (t1 - t0))
        hf.append(b[:, :-1].numel() / (time.perf_counter() - t1))
    trainer.close()
    shutdown_distributed()
    peak = trainer.metrics.peak
    fpt = flops_per_token(cfg.model, SEQ)
    return {"ours_tokens_per_s": steady(ours), "hf_tokens_per_s": steady(hf), "ratio": steady(ours) / steady(hf),
            "ours_mfu": steady(ours) * fpt / peak, "hf_mfu": steady(hf) * fpt / peak, "peak_flops": peak}


def loader_rate(data: Path, n: int = 400) -> float:
    start = time.perf_counter()
    batches(data, n)
    return n * MICRO * SEQ / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "runs" / "demo" / "data"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_data(args.data, Path(tmp))
        runs = Path(tmp) / "runs"
        runs.mkdir()
        for name, (config, extra) in CASES.items():
            results[name] = run_ours(config, extra, data, args.steps, runs)
        results["interleaved, same batches: ours vs HF"] = run_interleaved(data, args.steps, Path(tmp))
        results["loader_tokens_per_s"] = loader_rate(data)
    fastest = max(r["tokens_per_s"] for r in results.values() if isinstance(r, dict) and "tokens_per_s" in r)
    results["loader_vs_step"] = results["loader_tokens_per_s"] / fastest
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
