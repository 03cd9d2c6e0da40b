"""How close the planner's memory and step-time estimates come to a real training step.

For each config, a child process builds the model, runs a few real optimizer steps (forward,
backward, AdamW; the config's micro batch, sequence length, precision and gradient accumulation)
and reports its peak memory: on CPU the rise of the peak resident set over the level after the
imports (the kernel's high-water mark, reset just before the model is built), on a GPU
`torch.cuda.max_memory_allocated`. The parent compares it with `cluster.plan.estimate_memory`
for the same layout (one rank) and prints ratios; it exits non-zero when a memory ratio is
outside the tolerance.

    python bench/plan_accuracy.py [CONFIG ...] [--device cpu|cuda] [--json] [--tolerance 0.15]

With --comm it checks the communication model instead (cluster/comm.py): for 2 and 4 gloo processes,
bench/comm_accuracy_child.py records every collective of a real ZeRO-1, 2 and 3 step and of a tiny-switch
step with expert parallelism, replays them timed, and measures gloo's per-call latency and bandwidth per
op on the same processes, alternating with the replays; the planner's calls and volumes at those figures
(alpha-beta) are the prediction. Gloo's bandwidth changes with the message size, so it is measured at the
per-call sizes the planner models for each run.

    python bench/plan_accuracy.py --comm [--nproc 2 4] [--repeats 3] [--json] [--tolerance 0.25]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # comm_accuracy_child: its model sizes
DEFAULT_CONFIGS = ["configs/train/tiny-gpt-cpu.yaml", "configs/train/tiny-switch-cpu.yaml"]
OPTIMIZER_STEPS = 2  # the second step is the steady state: Adam moments exist from the first


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _warm_up(run, device: str, engine_kind: str) -> None:
    """One step of the same model shrunk to nothing, so the code pages of every kernel the real
    steps call are already resident: the resident-set peak then counts data, not libtorch's code."""
    data = run.model_dump()
    data["model"].update(vocab_size=64, n_ctx=16, local_window=4, decoder_start_token_id=0)
    data["train"].update(seq_len=8, micro_batch_size=1, global_batch_size=1, objective="causal_lm")
    _train_steps(type(run).model_validate(data), device, engine_kind)


def _train_steps(run, device: str, engine_kind: str) -> list[float]:
    """Seconds per optimizer step of the trainer's DeepSpeed engine (`deepspeed`) or of a plain
    PyTorch AdamW loop (`torch`), on random tokens."""
    import torch

    from trainer.model.counting import training_example

    t = run.train
    ex = training_example(run.model, train=t)  # an encoder-decoder's inputs and targets differ in length
    accum = run.for_world(1).gradient_accumulation
    step = _deepspeed_step(run, accum) if engine_kind == "deepspeed" else _torch_step(run, device, accum)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(OPTIMIZER_STEPS):
        start = time.perf_counter()
        for micro in range(accum):
            decoder = run.model.arch == "decoder"
            width = ex.inputs + 1 if decoder else ex.inputs + ex.targets
            idx = torch.randint(run.model.vocab_size, (t.micro_batch_size, width), generator=gen)
            x, y = (idx[:, :-1], idx[:, 1:]) if decoder else idx.split([ex.inputs, ex.targets], 1)
            step(x.contiguous().to(device), y.contiguous().to(device), micro == accum - 1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _torch_step(run, device: str, accum: int):
    import torch

    from trainer.model import model_for

    t = run.train
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    model = model_for(run.model).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                  weight_decay=t.weight_decay)

    def step(x, y, last: bool) -> None:
        out = model(x, y)  # held through backward, as the trainer holds it for the MoE statistics
        (out.loss / accum).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def _deepspeed_step(run, accum: int):
    """The trainer's own model construction and engine (trainer/main.py), one rank."""
    from trainer.distributed import init_distributed
    from trainer.engine import build_engine, build_model

    init_distributed()
    engine = build_engine(run, build_model(run, 1, accum), 1, accum)

    def step(x, y, last: bool) -> None:
        out = engine(x, y)  # held through backward, as trainer/main.py does
        engine.backward(out.loss)
        engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary itself
    return step


def measure(config: str, device: str, engine_kind: str) -> dict:
    """Runs in the child process."""
    import torch

    from cluster.configio import load_run_config

    run = load_run_config(config)
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = _train_steps(run, device, engine_kind)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _warm_up(run, device, engine_kind)
        base = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        times = _train_steps(run, device, engine_kind)
        peak = _status_kib("VmHWM") * 1024 - base
    return {"peak_bytes": peak, "step_seconds": times, "threads": torch.get_num_threads()}


def estimate(config: str, device: str) -> dict:
    from cluster.configio import load_run_config
    from cluster.plan import Layout, estimate_memory, step_time_s
    from trainer.model.counting import training_example

    run = load_run_config(config)
    t = run.train
    ex = training_example(run.model, train=t)
    accum = run.for_world(1).gradient_accumulation
    layout = Layout(run.parallel.zero_stage, 1, 1, t.micro_batch_size, accum, t.activation_checkpointing)
    memory = estimate_memory(run.model, layout, ex, t.precision)
    peak = _device_peak(t.precision, device)
    flops, seconds = step_time_s(run.model, ex, t.global_batch_size, 1, run.cluster.assumed_mfu, peak / 1e12,
                                 t.activation_checkpointing)
    return {"memory": {k: getattr(memory, k) for k in ("weights", "grads", "optimizer", "activations")},
            "total_bytes": memory.total, "step_seconds": seconds, "flops_per_step": flops,
            "assumed_mfu": run.cluster.assumed_mfu, "peak_flops": peak}


def _device_peak(precision: str, device: str) -> float:
    """The same peak the trainer's MFU uses: a datasheet figure on known GPUs, a measured matmul on CPU."""
    from trainer.metrics import device_peak

    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return device_peak(precision)[0]


def compare(config: str, device: str, engine_kind: str) -> dict:
    child = subprocess.run([sys.executable, __file__, "--child", config, "--device", device, "--engine", engine_kind],
                           capture_output=True, text=True, check=False, cwd=REPO)
    if child.returncode != 0:
        raise RuntimeError(f"measuring {config} failed:\n{child.stderr[-2000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    est = estimate(config, device)
    steady = sorted(measured["step_seconds"][1:])  # the first step pays for lazy allocations
    median = steady[len(steady) // 2]
    return {"config": config, "device": device, "engine": engine_kind, "measured_peak_bytes": measured["peak_bytes"],
            "estimated_peak_bytes": est["total_bytes"], "memory_ratio": est["total_bytes"] / measured["peak_bytes"],
            "estimate_breakdown_bytes": est["memory"], "measured_step_s": median,
            "estimated_step_s": est["step_seconds"], "step_time_ratio": est["step_seconds"] / median,
            "assumed_mfu": est["assumed_mfu"], "peak_flops": est["peak_flops"],
            "achieved_mfu": est["flops_per_step"] / median / est["peak_flops"], "threads": measured["threads"]}


# Which recorded phase:op is which of the planner's kinds (cluster.comm.Collective.kind). Not modelled: the
# step's gradient-norm and overflow all-reduces (a few bytes) and ZeRO-3's gathers of its persistent small
# parameters after the step (one call each, a few KB).
MEASURED_KIND = {"backward:all_reduce": "grad_reduce", "step:all_gather_into_tensor": "param_gather",
                 "forward:all_gather_into_tensor": "zero3_forward_gather",
                 "backward:all_gather_into_tensor": "zero3_backward_gather",
                 "backward:reduce_scatter_tensor": "grad_reduce_scatter",
                 "forward:all_to_all_single": "all_to_all", "backward:all_to_all_single": "all_to_all"}


def predict_comm(overrides: list[str], world: int, alpha_beta: dict) -> dict[str, tuple[float, int]]:
    """(seconds, calls) by kind: the planner's collectives for the run the child trained, at gloo's measured
    per-call latency and bandwidth of each op."""
    from cluster.comm import collectives
    from cluster.configio import load_run_config
    from trainer.model.counting import training_example

    from comm_accuracy_child import SIZES

    sets = [f"model.{k}={v}" for k, v in SIZES.items()] + ["train.seq_len=32", "train.micro_batch_size=1"]
    run = load_run_config(REPO / overrides[0], sets + overrides[1:])
    t, p = run.train, run.parallel
    colls = collectives(run.model, p.zero_stage, world, p.ep_size, t.micro_batch_size, 2,
                        training_example(run.model, train=t), t.precision, gpus_per_node=world)
    out: dict[str, tuple[float, int]] = {}
    for c in colls:
        if c.group_size > 1:
            seconds, calls = out.get(c.kind, (0.0, 0))
            out[c.kind] = (seconds + c.seconds(*alpha_beta[c.op]), calls + c.calls * c.buckets)
    return out


def measured_comm(repeat: dict, zero_stage: int) -> dict[str, tuple[float, int]]:
    """(seconds, calls) by kind of the replayed step."""
    out: dict[str, tuple[float, int]] = {}
    for key, seconds in repeat["seconds"].items():
        kind = MEASURED_KIND.get(key)
        if kind is None or (zero_stage == 3 and key.startswith("step:")):
            continue
        total, calls = out.get(kind, (0.0, 0))
        out[kind] = (total + seconds, calls + repeat["calls"][key])
    return out


def compare_comm(nprocs: list[int], repeats: int) -> list[dict]:
    import re

    from trainer.distributed import free_port

    rows = []
    for n in nprocs:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        child = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                                str(REPO / "bench/comm_accuracy_child.py"), str(repeats)],
                               capture_output=True, text=True, cwd=REPO, env=env, check=False)
        found = re.search(r"^RESULT (.*)$", child.stdout, re.M)
        if child.returncode != 0 or not found:
            raise RuntimeError(f"the {n}-process comm run failed:\n{child.stderr[-3000:]}")
        result = json.loads(found.group(1))
        from comm_accuracy_child import A2A_SETS

        runs = {f"ZeRO-{z}": (["configs/train/tiny-gpt-cpu.yaml", f"parallel.zero_stage={z}"], int(z),
                              result["zero"][z]) for z in ("1", "2", "3")}
        runs["expert all-to-all"] = (["configs/train/tiny-switch-cpu.yaml", "parallel.zero_stage=1",
                                      f"parallel.ep_size={n}"] + A2A_SETS, 1, result["all_to_all"])
        for name, (overrides, stage, reps) in runs.items():
            for r in reps:
                predicted = predict_comm(overrides, n, r["alpha_beta"])
                measured = measured_comm(r, stage)
                for kind in sorted(set(predicted) | set(measured)):
                    if name == "expert all-to-all" and kind != "all_to_all":
                        continue  # that run's ZeRO-1 traffic is the ZeRO-1 row's
                    pred_s, pred_calls = predicted.get(kind, (0.0, 0))
                    meas_s, meas_calls = measured.get(kind, (0.0, 0))
                    rows.append({"run": name, "nproc": n, "kind": kind, "predicted_s": pred_s, "measured_s": meas_s,
                                 "predicted_calls": pred_calls, "measured_calls": meas_calls,
                                 "alpha_beta": r["alpha_beta"]})
    return rows


def print_comm(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["run"], r["nproc"], r["kind"]), []).append(r)
    print(f"{'run':18} {'nproc':>5} {'kind':22} {'calls':>7} {'predicted s':>12} {'measured s':>11} "
          f"{'ratio (each repeat)':>24}")
    for (run, n, kind), rs in groups.items():
        ratios = " ".join(f"{r['predicted_s'] / r['measured_s']:.2f}" if r["measured_s"] else "-" for r in rs)
        pred = sorted(r["predicted_s"] for r in rs)[len(rs) // 2]
        meas = sorted(r["measured_s"] for r in rs)[len(rs) // 2]
        calls = f"{rs[0]['predicted_calls']}/{rs[0]['measured_calls']}"  # the model's / DeepSpeed's
        print(f"{run:18} {n:5d} {kind:22} {calls:>7} {pred:12.3f} {meas:11.3f} {ratios:>24}")
    for n in sorted({r["nproc"] for r in rows}):
        fits = list({id(r["alpha_beta"]): r["alpha_beta"] for r in rows if r["nproc"] == n}.values())
        spans = []
        for op in sorted({op for f in fits for op in f}):
            alphas = sorted(f[op][0] * 1e3 for f in fits if op in f)
            betas = sorted(f[op][1] / 1e6 for f in fits if op in f)
            spans.append(f"{op} {alphas[0]:.2f}-{alphas[-1]:.2f} ms + {betas[0]:.0f}-{betas[-1]:.0f} MB/s")
        print(f"gloo at {n} processes, per-call latency + bandwidth over the repeats: " + "; ".join(spans))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tolerance", type=float, default=0.15, help="allowed |estimate/measured - 1| for memory")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed",
                        help="the trainer's DeepSpeed engine (default) or a plain PyTorch AdamW loop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--comm", action="store_true", help="check the communication model over gloo instead")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="--comm: process counts")
    parser.add_argument("--repeats", type=int, default=3, help="--comm: repeats per run, each call's lower "
                        "quartile over 7 rounds of microbenchmark and replay")
    args = parser.parse_args()
    if args.comm:
        rows = compare_comm(args.nproc, args.repeats)
        print(json.dumps(rows, indent=2)) if args.json else print_comm(rows)
        tolerance = 0.25 if args.tolerance == 0.15 else args.tolerance
        medians = {}
        for r in rows:
            medians.setdefault((r["run"], r["nproc"], r["kind"]), []).append(r["predicted_s"] / max(r["measured_s"], 1e-9))
        return 0 if all(abs(sorted(v)[len(v) // 2] - 1) <= tolerance for v in medians.values()) else 1
    if args.child:
        print(json.dumps(measure(args.configs[0], args.device, args.engine)))
        return 0
    results = [compare(c, args.device, args.engine) for c in args.configs]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'config':40} {'measured MB':>12} {'estimated MB':>13} {'mem ratio':>9} "
              f"{'step s':>8} {'est s':>8} {'time ratio':>10} {'MFU':>6}")
        for r in results:
            print(f"{r['config']:40} {r['measured_peak_bytes'] / 1e6:12.1f} {r['estimated_peak_bytes'] / 1e6:13.1f} "
                  f"{r['memory_ratio']:9.3f} {r['measured_step_s']:8.3f} {r['estimated_step_s']:8.3f} "
                  f"{r['step_time_ratio']:10.3f} {r['achieved_mfu']:6.3f}")
    return 0 if all(abs(r["memory_ratio"] - 1) <= args.tolerance for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
