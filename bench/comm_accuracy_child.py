"""One process of bench/plan_accuracy.py --comm (started by torch.distributed.run): real DeepSpeed steps
whose collectives are recorded at DeepSpeed's backend object (ZeRO's) or at all_to_all_single (our expert
layers'), then replayed timed, alternating with a microbenchmark of gloo's per-call latency and bandwidth
per op (at the per-call sizes the planner models for the run) on the same processes; rank 0 prints one
JSON line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SIZES = {"d_model": 256, "n_head": 4}  # ~14M parameters: 58 MB of fp32 gradients, so bandwidth dominates latency
LATENCY_BYTES = 1 << 16  # calls up to this size are latency: they do not set the bandwidth
ROUNDS = 7  # per repeat: microbenchmark and replay alternate, so both see the same load
LATENCY_SAMPLES = 8  # tiny calls per round: every call of the step pays their latency
MODEL_OP = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
            "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}


def _timed(fn) -> float:
    """Seconds of one call, every rank starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fast(values: list[float]) -> float:
    """The lower quartile: on a shared machine, other jobs that hold a rank off the CPU stretch some calls
    several-fold; this is the call's time without them."""
    return sorted(values)[len(values) // 4]


def _collective(op: str, input_bytes: int, group=None):
    """`op` on an fp32 input of `input_bytes`, as a call with its buffers allocated and touched up front:
    DeepSpeed's flat buffers and a GPU's caching allocator do not pay page faults per call, a fresh tensor does."""
    n = dist.get_world_size(group)
    elements = input_bytes // 4
    src = torch.ones(elements)
    if op == "all_reduce":
        return lambda: dist.all_reduce(src, group=group)
    if op == "all_gather_into_tensor":
        out = torch.zeros(elements * n)
        return lambda: dist.all_gather_into_tensor(out, src, group=group)
    if op == "reduce_scatter_tensor":
        out = torch.zeros(elements // n)
        return lambda: dist.reduce_scatter_tensor(out, src, group=group)
    out = torch.zeros(elements)
    return lambda: dist.all_to_all_single(out, src, group=group)


def model_calls(run) -> dict[str, dict[int, int]]:
    """Per op, {whole buffer bytes of one call: calls per step} as the planner models this run
    (cluster.comm.collectives)."""
    from cluster.comm import collectives
    from trainer.model.counting import training_example

    n, t, p = dist.get_world_size(), run.train, run.parallel
    colls = collectives(run.model, p.zero_stage, n, p.ep_size, t.micro_batch_size, run.gradient_accumulation,
                        training_example(run.model, train=t), t.precision, gpus_per_node=n)
    out: dict[str, dict[int, int]] = {}
    for c in colls:
        if c.group_size == n:  # the bench's groups: every rank
            per_call = int(c.buffer_bytes / c.buckets)
            size = max(4 * n, per_call - per_call % (4 * n * n))  # n floats per rank
            out.setdefault(c.op, {})[size] = out.get(c.op, {}).get(size, 0) + c.calls * c.buckets
    return out


def _bench_calls(calls: dict[str, dict[int, int]]) -> dict[tuple[str, int], tuple[object, int]]:
    """(op, whole buffer bytes) -> (a call on every rank, times per round): a tiny one for the latency, then the
    model's sizes as often as the model makes them, so both sides take each size's quartile over as many calls."""
    n = dist.get_world_size()
    out = {}
    for op, name in MODEL_OP.items():
        for buffer, count in {4 * n: LATENCY_SAMPLES, **calls.get(name, {})}.items():
            out[(op, buffer)] = (_collective(op, buffer // n if op == "all_gather_into_tensor" else buffer), count)
    return out


def alpha_beta(seconds: dict[tuple[str, int], float]) -> dict[str, list[float]]:
    """Per op of the run: [latency s, bytes/s] of `alpha + ring bytes / beta`. Alpha is the tiny call's time;
    beta fits the model's sizes over LATENCY_BYTES by least squares on seconds, so the large calls that take the
    step's time weigh most."""
    n = dist.get_world_size()
    out = {}
    for op, name in MODEL_OP.items():
        alpha = seconds[(op, 4 * n)]
        ring = (n - 1) / n * (2 if name == "all_reduce" else 1)
        points = [(ring * b, t) for (o, b), t in seconds.items() if o == op and b > LATENCY_BYTES]
        if points:
            excess = sum(x * (t - alpha) for x, t in points)
            out[name] = [alpha, sum(x * x for x, _ in points) / excess if excess > 0 else float("inf")]
    return out


A2A_SETS = ["train.seq_len=256", "train.micro_batch_size=4"]


def _run(overrides: list[str]):
    from cluster.configio import load_run_config

    world = dist.get_world_size()
    sets = [f"model.{k}={v}" for k, v in SIZES.items()] + ["train.seq_len=32", "train.micro_batch_size=1"]
    run = load_run_config(REPO / overrides[0], sets + overrides[1:])
    run.train.global_batch_size = 2 * world * run.train.micro_batch_size  # two micro-batches per step
    return run.for_world(world)


def _input(op: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a collective sends: all_reduce's only one; the others take (output, input)."""
    positional = [a for a in args if isinstance(a, torch.Tensor)]
    if op == "all_reduce" or len(positional) >= 2:
        return positional[0] if op == "all_reduce" and positional else positional[1] if positional else kwargs["tensor"]
    return next(kwargs[k] for k in ("tensor", "input_tensor", "input") if k in kwargs)


def record_collectives(run) -> list[tuple]:
    """Train one warm-up step and one recorded step; returns (phase, op, input bytes, group) for every
    collective DeepSpeed (deepspeed.comm) and our expert layers (torch.distributed) issue in the second."""
    from deepspeed.comm import comm as ds_comm

    from trainer.engine import build_engine, build_model

    world, accum = dist.get_world_size(), run.gradient_accumulation
    engine = build_engine(run, build_model(run, world, accum), world, accum)
    calls, phase = [], {"now": None}
    # DeepSpeed's backend object (every ZeRO collective passes it once), and torch's for our all-to-all.
    targets = [(ds_comm.cdb, op) for op in list(MODEL_OP)[:3]] + [(dist, "all_to_all_single")]
    originals = {(mod, op): getattr(mod, op) for mod, op in targets}

    def recorder(original, op):
        def call(*args, **kwargs):
            if phase["now"] is not None:
                tensor = _input(op, args, kwargs)
                group = kwargs.get("group") or next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                calls.append((phase["now"], op, tensor.numel() * tensor.element_size(), group))
            return original(*args, **kwargs)
        return call

    for (mod, op), original in originals.items():
        setattr(mod, op, recorder(original, op))
    gen = torch.Generator().manual_seed(0)
    try:
        for step in range(2):
            for _ in range(accum):
                t = run.train
                idx = torch.randint(run.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen)
                phase["now"] = "forward" if step else None
                out = engine(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
                phase["now"] = "backward" if step else None
                engine.backward(out.loss)
                phase["now"] = "step" if step else None
                engine.step()
            phase["now"] = None
    finally:
        for (mod, op), original in originals.items():
            setattr(mod, op, original)
    return calls


def measure(overrides: list[str], repeats: int) -> list[dict]:
    """Each repeat: ROUNDS of (the microbenchmark, one replay of the recorded step), then each call's lower
    quartile, on both sides alike. The replay issues the same collectives, same sizes and groups,
    synchronously, on buffers made once."""
    run = _run(overrides)
    calls = record_collectives(run)
    made: dict[tuple, object] = {}
    step = [(f"{phase}:{op}", made.setdefault((op, size, group), _collective(op, size, group)))
            for phase, op, size, group in calls]
    bench = _bench_calls(model_calls(run))
    volume: dict[str, int] = {}
    counts: dict[str, int] = {}
    for phase, op, size, _ in calls:
        volume[f"{phase}:{op}"] = volume.get(f"{phase}:{op}", 0) + size
        counts[f"{phase}:{op}"] = counts.get(f"{phase}:{op}", 0) + 1
    out = []
    for _ in range(repeats):
        bench_times: dict[tuple, list[float]] = {}
        replays: list[list[float]] = [[] for _ in step]
        for _ in range(ROUNDS):
            for key, (fn, count) in bench.items():
                bench_times.setdefault(key, []).extend(_timed(fn) for _ in range(count))
            for (_, fn), times in zip(step, replays):
                times.append(_timed(fn))
        seconds: dict[str, float] = {}
        for (key, _), times in zip(step, replays):
            seconds[key] = seconds.get(key, 0.0) + _fast(times)
        fits = alpha_beta({key: _fast(ts) for key, ts in bench_times.items()})
        out.append({"alpha_beta": fits, "seconds": seconds, "input_bytes": volume, "calls": counts,
                    "world": dist.get_world_size()})
    return out


def main() -> None:
    from trainer.distributed import init_distributed

    init_distributed()
    n, repeats = dist.get_world_size(), int(sys.argv[1]) if len(sys.argv) > 1 else 3
    result = {"world": n, "zero": {}}
    for stage in (1, 2, 3):
        result["zero"][stage] = measure(["configs/train/tiny-gpt-cpu.yaml", f"parallel.zero_stage={stage}"], repeats)
    # Longer sequences so each all-to-all carries over a MB: bandwidth counts, not only gloo's latency.
    result["all_to_all"] = measure(["configs/train/tiny-switch-cpu.yaml", "parallel.zero_stage=1",
                                    f"parallel.ep_size={n}"] + A2A_SETS, repeats)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
