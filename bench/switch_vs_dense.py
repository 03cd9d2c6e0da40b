"""Does Switch beat dense? A dense model and its Switch counterpart (the same model with its FFNs routed,
so the same FLOPs per token) trained on the same tokens, several seeds, held-out loss every k steps.

Each run is the trainer itself, in this process: `trainer.main.Trainer.train_step` (the DeepSpeed engine,
the loader, the lr schedule, the loss with its aux and z terms), not a second training loop. The held-out
loss is `pretrain eval`'s (`trainer.eval.heldout_loss`, eval mode), on the same held-out windows for every
run. Per seed (train.seed: the initial weights and the data order; both models share both) it reports:
- the held-out curve of each model;
- the steps each model needs to reach the dense model's final held-out loss (the first eval interval where
  its curve gets there, interpolated linearly), and their ratio Switch/dense (the paper: < 1);
- for the Switch model, per MoE layer over the steps after the lr warm-up: the mean fraction of tokens
  dropped for being over capacity, and the expert load max/mean (the busiest expert's share x the number
  of experts), its mean over steps and its worst step.

    nice -n 10 python bench/switch_vs_dense.py [--dense TRAIN_YAML] [--switch TRAIN_YAML] [--seeds 1 2 3]
        [--steps N] [--jobs J] [--eval-every K] [--eval-batches B] [--data DIR] [--set KEY=VALUE ...]
        [--set-switch KEY=VALUE ...] [--set-dense KEY=VALUE ...] [--out FILE.json]

The pair defaults to configs/train/tiny-gpt-cpu.yaml and tiny-switch-cpu.yaml; the encoder-decoder pair is
tiny-t5-cpu.yaml and tiny-switch-t5-cpu.yaml (span corruption: the held-out loss is that of the targets).
The script refuses a pair whose models differ anywhere but `moe`, or whose configs would draw different
tokens. `--set` applies to both runs, `--set-switch` / `--set-dense` to one. `--steps` keeps the configs'
lr schedule (set train.decay_tokens to match). Results: docs/benchmarks.md, "Switch vs dense (CPU)".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import torch  # noqa: E402

from cluster.configio import load_run_config  # noqa: E402
from trainer.config import RunConfig  # noqa: E402
from trainer.errors import ConfigError, TrainError  # noqa: E402
from trainer.model.counting import flops_per_token  # noqa: E402

# What decides the token stream: the two configs must agree on all of it (train.seed is set per run).
SAME_TOKENS = ("data", "train.objective", "train.span_corruption", "train.seq_len", "train.micro_batch_size",
               "train.global_batch_size", "train.max_steps",
               "train.batch_rampup_tokens", "train.batch_rampup_start_tokens")


ROUTING_KEYS = ("tokens", "moe_layers", "expert_load", "dropped_frac_per_layer")  # of a step's metrics record


def _get(cfg: RunConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def load_pair(args) -> tuple[RunConfig, RunConfig]:
    common = [*args.set, *([f"train.max_steps={args.steps}"] if args.steps else []),
              *([f"data.path={args.data}"] if args.data else []),
              "logging.wandb_mode=disabled", "checkpoint.interval=1000000"]  # no checkpoints: the runs are thrown away
    dense = load_run_config(args.dense, common + list(args.set_dense))
    switch = load_run_config(args.switch, common + list(args.set_switch))
    for key in SAME_TOKENS:
        if _get(dense, key) != _get(switch, key):
            raise ConfigError(f"{key}: {args.dense} has {_get(dense, key)!r} but {args.switch} has "
                              f"{_get(switch, key)!r}: the two runs must train on the same tokens")
    if switch.model.moe is None or dense.model.moe is not None:
        raise ConfigError(f"model.moe: {args.switch} must set it (the Switch model) and {args.dense} must not")
    shape = {"name", "moe"}  # everything else must match, so FLOPs per token do
    differ = sorted(k for k, v in dense.model.model_dump(exclude=shape).items() if getattr(switch.model, k) != v)
    if differ:
        raise ConfigError(f"model.{differ[0]}: {args.dense} and {args.switch} differ in {', '.join(differ)}: the "
                          f"Switch model must be the dense one with its FFNs routed")
    return dense, switch


def heldout_set(cfg: RunConfig, batches: int) -> tuple[list, Callable]:
    """`pretrain eval`'s held-out batches and loss for the run's objective (causal LM: next-token loss;
    span corruption: the loss of the targets made of the held-out documents with the run's seed)."""
    from trainer.data import heldout_batches, load_manifest, objective_for
    from trainer.eval import heldout_loss

    manifest = load_manifest(cfg.data.path, cfg.model.vocab_size, cfg.data.weights)
    objective = objective_for(cfg.train, manifest)
    held = heldout_batches(manifest, objective, cfg.train.micro_batch_size, cfg.data.heldout_percent, batches)
    if not held:
        raise TrainError(f"data.heldout_percent: {cfg.data.heldout_percent}% of {cfg.data.path} makes no held-out "
                         f"micro-batch of {cfg.train.micro_batch_size}; raise it")
    tokens = sum(objective.predicted(objective.split(b)[-1]) for b in held)
    return held, lambda model, b: heldout_loss(model, b, objective)["heldout_loss"], tokens


def evaluate(model: torch.nn.Module, batches: list, loss_fn: Callable) -> float:
    model.eval()
    try:
        return loss_fn(model, batches)
    finally:
        model.train()


def train_curve(cfg: RunConfig, run_dir: Path, eval_every: int, heldout: tuple[list, Callable, int]) -> dict:
    """Train one run, evaluating at step 0, every `eval_every` steps and at the end; MoE step records kept."""
    from trainer.distributed import init_distributed, shutdown_distributed
    from trainer.launch import prepare_run_dir
    from trainer.logs import stdout_to_log
    from trainer.main import Trainer

    saved_env = dict(os.environ)
    prepare_run_dir(cfg, run_dir, 1)
    (run_dir / "logs").mkdir()  # Trainer.close writes its peak memory there
    with stdout_to_log("deepspeed"):
        init_distributed()
    trainer = None
    curve, moe_steps, start = [], [], time.perf_counter()
    try:
        trainer = Trainer(cfg, run_dir)
        model = trainer.engine.module
        curve.append((0, evaluate(model, *heldout[:2])))
        while trainer.step < cfg.train.max_steps:
            record = trainer.train_step()
            if "expert_load" in record:
                moe_steps.append({k: record[k] for k in ROUTING_KEYS})
            if trainer.step % eval_every == 0 or trainer.step == cfg.train.max_steps:
                curve.append((trainer.step, evaluate(model, *heldout[:2])))
                print(f"  {cfg.model.name} seed {cfg.train.seed} step {trainer.step}: held-out {curve[-1][1]:.4f}",
                      file=sys.stderr, flush=True)
    finally:
        if trainer is not None:
            trainer.close()
        shutdown_distributed()
        os.environ.clear()
        os.environ.update(saved_env)
    out = {"curve": curve, "seconds": round(time.perf_counter() - start, 1)}
    if moe_steps:
        out["moe"] = routing_summary(moe_steps, cfg.train.warmup_tokens)
    return out


def routing_summary(steps: list[dict], warmup_tokens: int) -> dict:
    """Per MoE layer over the steps after the lr warm-up: mean dropped fraction, load max/mean (mean, worst)."""
    after = [s for s in steps if s["tokens"] > warmup_tokens] or steps
    summary = {}
    for i, layer in enumerate(steps[0]["moe_layers"]):
        ratios = [max(s["expert_load"][i]) * len(s["expert_load"][i]) for s in after]
        summary[f"layer {layer}"] = {
            "dropped_frac": round(statistics.mean(s["dropped_frac_per_layer"][i] for s in after), 4),
            "load_max_over_mean": round(statistics.mean(ratios), 3), "load_max_over_mean_worst": round(max(ratios), 3)}
    return summary


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """First step at which the held-out curve reaches `target`, interpolated between eval points; None if never."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def compare(dense: dict, switch: dict) -> dict:
    target = dense["curve"][-1][1]
    reach_dense, reach_switch = steps_to_reach(dense["curve"], target), steps_to_reach(switch["curve"], target)
    return {"dense_final": round(target, 4), "switch_final": round(switch["curve"][-1][1], 4),
            "steps_dense": reach_dense, "steps_switch": reach_switch,
            "ratio": None if reach_switch is None else round(reach_switch / reach_dense, 3)}


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def summarize(seeds: dict) -> dict:
    pairs = [s["compare"] for s in seeds.values()]
    ratios = [p["ratio"] for p in pairs]
    layer_names = list(next(iter(seeds.values()))["switch"]["moe"])
    return {"ratio": {"per_seed": ratios, **(spread(ratios) if None not in ratios else {"mean": None})},
            "dense_final": spread([p["dense_final"] for p in pairs]),
            "switch_final": spread([p["switch_final"] for p in pairs]),
            "switch_minus_dense": spread([p["switch_final"] - p["dense_final"] for p in pairs]),
            "routing": {layer: {key: max(s["switch"]["moe"][layer][key] for s in seeds.values())
                                for key in ("dropped_frac", "load_max_over_mean")} for layer in layer_names}}


def print_seed(seed: int, result: dict) -> None:
    c = result["compare"]
    reached = "never reaches it (ratio > 1)" if c["steps_switch"] is None else \
        f"reaches it at step {c['steps_switch']:.0f}, dense at {c['steps_dense']:.0f}: ratio {c['ratio']}"
    print(f"seed {seed}: final held-out loss dense {c['dense_final']:.4f} ({result['dense']['seconds']:.0f} s), "
          f"switch {c['switch_final']:.4f} ({result['switch']['seconds']:.0f} s); switch {reached}", flush=True)
    for layer, r in result["switch"]["moe"].items():
        print(f"  {layer}: dropped {100 * r['dropped_frac']:.2f}%, load max/mean {r['load_max_over_mean']:.2f} "
              f"(worst step {r['load_max_over_mean_worst']:.2f})", flush=True)


def run_seed(dense: RunConfig, switch: RunConfig, seed: int, args: argparse.Namespace, tmp: Path,
             heldout: Optional[tuple] = None) -> dict:
    """Both runs of one seed and their comparison (in a worker process when --jobs > 1)."""
    if heldout is None:  # a worker: the loss function does not pickle, so it is made again here
        torch.set_num_threads(args.threads)
        from trainer.malloc import keep_freed_memory

        keep_freed_memory()
        heldout = heldout_set(dense, args.eval_batches)
    runs = {name: train_curve(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})}),
                              tmp / f"{name}-{seed}", args.eval_every, heldout)
            for name, cfg in (("dense", dense), ("switch", switch))}
    runs["compare"] = compare(runs["dense"], runs["switch"])
    return runs


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", default=str(REPO / "configs/train/tiny-gpt-cpu.yaml"), help="train YAML, dense")
    parser.add_argument("--switch", default=str(REPO / "configs/train/tiny-switch-cpu.yaml"), help="train YAML, Switch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, help="train.max_steps for both (default: the configs')")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out micro-batches per evaluation")
    parser.add_argument("--data", help="data.path for both (default: the configs')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    parser.add_argument("--set-dense", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set-switch", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process each")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from trainer.malloc import keep_freed_memory

    keep_freed_memory()  # as trainer.main.train does on CPU
    try:
        dense, switch = load_pair(args)
        heldout = heldout_set(dense, args.eval_batches)
    except (ConfigError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flops = {"dense": flops_per_token(dense.model, train=dense.train),  # per raw token, whatever the objective
             "switch": flops_per_token(switch.model, train=switch.train)}
    print(f"FLOPs per token: dense {flops['dense']:,.0f}, switch {flops['switch']:,.0f} "
          f"(switch/dense {flops['switch'] / flops['dense']:.4f}); held-out tokens per eval "
          f"{heldout[2]}", flush=True)
    results = {"dense_config": args.dense, "switch_config": args.switch, "overrides": vars(args)["set"],
               "overrides_dense": args.set_dense, "overrides_switch": args.set_switch, "flops_per_token": flops,
               "steps": dense.train.max_steps, "eval_every": args.eval_every, "seeds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # --jobs > 1: one process per seed, each with its own torch threads and its own world of one
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) if args.jobs > 1 \
                else contextlib.nullcontext() as pool:
            done = pool.map(run_seed, *zip(*[(dense, switch, seed, args, Path(tmp)) for seed in args.seeds])) \
                if pool else (run_seed(dense, switch, seed, args, Path(tmp), heldout) for seed in args.seeds)
            for seed, runs in zip(args.seeds, done):
                results["seeds"][seed] = runs
                print_seed(seed, runs)
    results["summary"] = summarize(results["seeds"])
    print(json.dumps(results["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
