"""train.compile (regional torch.compile of each block) vs eager: one GPT forward + backward, paired
interleaved rounds in one process, the same weights and batch.

    python bench/compile_step.py                          # a GPT-3-shaped model small enough for a CPU
    python bench/compile_step.py --model configs/model/gpt3-125m.yaml --seq 2048 --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from trainer.config import ModelConfig  # noqa: E402
from trainer.engine import apply_compile  # noqa: E402
from trainer.model import model_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "configs/model/gpt3-125m.yaml"))
    ap.add_argument("--set", action="append", default=["n_layer=4", "d_model=256", "n_head=4"],
                    help="model field overrides (default: 4 layers of width 256)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    raw = yaml.safe_load(Path(args.model).read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        raw[key] = yaml.safe_load(value)
    cfg = ModelConfig(**raw)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    eager = model_for(cfg).to(args.device, dtype)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)

    def step(model) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(idx, idx).loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    start = time.perf_counter()
    step(compiled)
    print(f"{cfg.name}: {sum(p.numel() for p in eager.parameters()) / 1e6:.1f}M parameters, batch {args.batch} x "
          f"{args.seq}, {args.dtype} on {args.device}; compiling took {time.perf_counter() - start:.1f} s", flush=True)
    step(eager)
    ratios, times = [], {"eager": [], "compiled": []}
    for r in range(args.rounds):
        pair = [("eager", eager), ("compiled", compiled)][:: 1 if r % 2 == 0 else -1]  # alternate who goes first
        got = {name: step(model) for name, model in pair}
        for name, t in got.items():
            times[name].append(t)
        ratios.append(got["compiled"] / got["eager"])
        print(f"round {r + 1}: eager {got['eager']:.3f} s, compiled {got['compiled']:.3f} s, "
              f"compiled/eager {ratios[-1]:.3f}", flush=True)
    print(f"median: eager {statistics.median(times['eager']):.3f} s, compiled {statistics.median(times['compiled']):.3f} s; "
          f"compiled/eager {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
