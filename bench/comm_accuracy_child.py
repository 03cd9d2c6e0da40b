"""One process of bench/plan_accuracy.py --comm (started by torch.distributed.run): a gloo bandwidth
microbenchmark, then real DeepSpeed steps whose collectives are timed by DeepSpeed's comms logger
(ZeRO's) or by a timer around all_to_all_single (our expert layers'); rank 0 prints one JSON line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

BENCH_ELEMENTS = 4_000_000  # 16 MB: the size of the step's larger buckets and partitions
SIZES = {"d_model": 256, "n_head": 4}  # ~14M parameters: 58 MB of fp32 gradients, so bandwidth dominates latency


def _timed(fn, repeats: int = 5) -> float:
    """Median seconds of `fn` over `repeats` calls, every rank starting together."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def link_bandwidth(elements: int, group=None) -> dict:
    """Bytes per second through each rank's link for each op, from ring volumes: (n-1)/n of the buffer
    (all-gather, reduce-scatter, all-to-all), 2(n-1)/n (all-reduce); and all-to-all's per-call latency."""
    n = dist.get_world_size(group)
    flat, out, part = torch.ones(elements), torch.empty(elements * n), torch.empty(elements // n)
    size, ring = elements * 4, (n - 1) / n
    seconds = {"all_gather": _timed(lambda: dist.all_gather_into_tensor(out, flat, group=group)) / n,
               "all_reduce": _timed(lambda: dist.all_reduce(flat, group=group)) / 2,
               "reduce_scatter": _timed(lambda: dist.reduce_scatter_tensor(part, flat, group=group)),
               "all_to_all": _timed(lambda: dist.all_to_all_single(torch.empty_like(flat), flat, group=group))}
    out = {op: ring * size / s for op, s in seconds.items()}  # all-gather's buffer is n inputs: per input above
    tiny = torch.ones(64 * n)
    out["all_to_all_latency_s"] = _timed(lambda: dist.all_to_all_single(torch.empty_like(tiny), tiny, group=group), 9)
    return out


A2A_SETS = ["train.seq_len=256", "train.micro_batch_size=4"]


def _run(overrides: list[str]):
    from cluster.configio import load_run_config

    world = dist.get_world_size()
    sets = [f"model.{k}={v}" for k, v in SIZES.items()] + ["train.seq_len=32", "train.micro_batch_size=1"]
    run = load_run_config(REPO / overrides[0], sets + overrides[1:])
    run.train.global_batch_size = 2 * world * run.train.micro_batch_size  # two micro-batches per step
    return run.for_world(world)


OPS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


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
    targets = [(ds_comm.cdb, op) for op in OPS[:3]] + [(dist, "all_to_all_single")]
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


def replay(calls: list[tuple]) -> dict:
    """Seconds of each (phase, op): the same collectives, same sizes and groups, issued synchronously."""
    n = dist.get_world_size()
    seconds: dict[str, float] = {}
    volume: dict[str, int] = {}
    for phase, op, size, group in calls:
        elements = size // 4
        size_n = dist.get_world_size(group)
        buf = torch.ones(elements)
        key = f"{phase}:{op}"
        dist.barrier()
        start = time.perf_counter()
        if op == "all_reduce":
            dist.all_reduce(buf, group=group)
        elif op == "all_gather_into_tensor":
            dist.all_gather_into_tensor(torch.empty(elements * size_n), buf, group=group)
        elif op == "reduce_scatter_tensor":
            dist.reduce_scatter_tensor(torch.empty(elements // size_n), buf, group=group)
        else:
            dist.all_to_all_single(torch.empty_like(buf), buf, group=group)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        volume[key] = volume.get(key, 0) + size
    return {"seconds": seconds, "input_bytes": volume, "world": n}


def measure(overrides: list[str], repeats: int) -> list[dict]:
    """Each repeat: the bandwidths, then the replay right after, so both see the same load."""
    calls = record_collectives(_run(overrides))
    return [{"bandwidth": link_bandwidth(BENCH_ELEMENTS), **replay(calls)} for _ in range(repeats)]


def main() -> None:
    from trainer.distributed import init_distributed

    init_distributed()
    n, repeats = dist.get_world_size(), int(sys.argv[1]) if len(sys.argv) > 1 else 3
    result = {"world": n, "zero": {}}
    for stage in (1, 2, 3):
        result["zero"][stage] = measure(["configs/train/tiny-gpt-cpu.yaml", f"parallel.zero_stage={stage}"], repeats)
    # Longer sequences so each all-to-all carries a few MB: the check is of volumes, not of gloo's latency.
    result["all_to_all"] = measure(["configs/train/tiny-switch-cpu.yaml", "parallel.zero_stage=1",
                                    f"parallel.ep_size={n}"] + A2A_SETS, repeats)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
