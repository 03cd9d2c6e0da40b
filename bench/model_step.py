"""Model benchmarks on this CPU, ours and a peer side by side in the same run.

(a) GPT training step (forward, backward, AdamW step), tokens/s: our GPT against Hugging Face
    GPT2LMHeadModel of the same shape and the same weights (fp32, dropout 0, same threads,
    same optimizer, loss computed the same way), interleaved repeats after warm-up, median and best,
    and the median of per-round ratios ("paired").
(a') The same step for GPT-3 Small as configured (alternating dense / locally banded attention, window 256)
    against Hugging Face GPTNeoForCausalLM, the same pattern, holding the same function
    (trainer/model/hf_neo.py; the logits are compared first), at GPT-3's context 2048 by default.
(b) Switch layer forward + backward: our SwitchFFN against deepspeed.moe.layer.MoE (top-1,
    capacity factor 1.25, no random token selection so both keep tokens in order, same expert
    MLP), and a dense FFN of one exp's shape on the same tokens (the FLOPs per token a top-1 layer does,
    without routing), median and best time of interleaved repeats, the median of the per-round ratios
    ("paired": each round times both back to back), and the peak resident memory one step adds
    over the weights (its fresh gradients included, the same size for both), each
    case in a fresh process with glibc's mmap threshold fixed so freed buffers leave RSS at once
    (peak = VmHWM after the step minus RSS before it; /proc/self/clear_refs resets VmHWM). On CPU the
    rounds also time a 256 MiB read and write, and the table gives the time the expert weights' traffic
    takes at that bandwidth (a floor the dense FFN, whose 2 MB of weights stay in cache, does not have).
    --baseline REV times our layer as of a git revision too, same seed, interleaved (a change's A/B).

    python bench/model_step.py [--part gpt|neo|moe|all] [--repeats N] [--threads N] [--default-malloc]
    python bench/model_step.py --part neo [--neo-batch 1] [--neo-seq 2048]
    python bench/model_step.py --part moe --device cuda   # the Switch layer on a GPU (max_memory_allocated)
    python bench/model_step.py --part moe --skip-memory --baseline HEAD   # a layer change vs the committed layer
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cluster.configio import load_model_config  # noqa: E402
from trainer.config import ModelConfig, MoEConfig  # noqa: E402
from trainer.distributed import free_port  # noqa: E402
from trainer.malloc import keep_freed_memory  # noqa: E402
from trainer.model import GPT, SwitchFFN  # noqa: E402
from trainer.model.hf import hf_config, load_hf_state_dict  # noqa: E402

GPT3_SMALL = REPO / "configs/model/gpt3-125m.yaml"
GPT_SHAPE = dict(n_layer=6, d_model=384, n_head=6, n_ctx=256, vocab_size=50257, dropout=0.0)
BATCH, SEQ = 8, 256
NEO_BATCH, NEO_SEQ = 1, 2048  # GPT-3's context: banded attention only pays at long T
MOE_HIDDEN, MOE_FF, MOE_TOKENS, CAPACITY = 256, 1024, 2048, 1.25
EXPERT_COUNTS = (8, 32, 128)


class Timing(NamedTuple):
    median: float
    best: float
    samples: list[float]  # seconds per call, one per round, in round order


def paired_ratio(slow: Timing, fast: Timing) -> float:
    """Median over rounds of slow/fast timed back to back in the same round: machine drift between
    rounds (this shared 2-core VM's speed wanders by up to 1.5x over a minute) cancels out."""
    return statistics.median(a / b for a, b in zip(slow.samples, fast.samples))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                      device: str = "cpu") -> dict[str, Timing]:
    """Seconds per call of each step, run round-robin so machine noise hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), t) for name, t in times.items()}


def train_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """Forward, backward and AdamW step of `model` (the same optimizer settings for every model)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return step


def token_batch(vocab_size: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return data[:, :-1], data[:, 1:]


def hf_steps(ours: GPT, hf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    def hf_loss() -> torch.Tensor:  # HF's `labels` would shift and drop a position; score all SEQ like ours
        logits = hf(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    return {"ours": train_step(ours, lambda: ours(x, targets=y).loss), "hf": train_step(hf, hf_loss)}


def gpt_steps() -> dict[str, Callable[[], None]]:
    from transformers import GPT2LMHeadModel

    cfg = ModelConfig(**GPT_SHAPE)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config(cfg))  # the default attention implementation (SDPA)
    ours = GPT(cfg)
    load_hf_state_dict(ours, hf.state_dict())
    return hf_steps(ours, hf, *token_batch(cfg.vocab_size, BATCH, SEQ))


def neo_steps(batch: int, seq: int) -> tuple[dict[str, Callable[[], None]], float]:
    """GPT-3 Small as configured (alternating dense / banded attention) and GPTNeoForCausalLM holding the same
    function (trainer/model/hf_neo.py); also the largest logit difference between the two on the timed batch."""
    from transformers import GPTNeoForCausalLM

    from trainer.model import hf_neo

    cfg = load_model_config(GPT3_SMALL)
    torch.manual_seed(0)
    ours = GPT(cfg)
    hf = GPTNeoForCausalLM(hf_neo.hf_config(cfg, eos_token_id=cfg.vocab_size - 1))  # eager: GPT-Neo's only CPU path
    hf.load_state_dict(hf_neo.to_hf_state_dict(ours), strict=True)
    x, y = token_batch(cfg.vocab_size, batch, seq)
    with torch.no_grad():
        ours.eval(), hf.eval()
        logit_diff = (ours(x).logits - hf(input_ids=x).logits).abs().max().item()
    return hf_steps(ours, hf, x, y), logit_diff


def speed_rows(t: dict[str, Timing], tokens: int, ours_name: str, hf_name: str) -> list[str]:
    tps = {name: tokens / timing.median for name, timing in t.items()}
    return [
        "| model | step median (s) | step best (s) | tokens/s (median) |", "|---|---|---|---|",
        f"| {ours_name} | {t['ours'].median:.3f} | {t['ours'].best:.3f} | {tps['ours']:.0f} |",
        f"| {hf_name} | {t['hf'].median:.3f} | {t['hf'].best:.3f} | {tps['hf']:.0f} |",
        f"| **speed ratio ours/HF** | median {t['hf'].median / t['ours'].median:.2f} | "
        f"best {t['hf'].best / t['ours'].best:.2f} | paired {paired_ratio(t['hf'], t['ours']):.2f} "
        f"(rounds {round_range(t['hf'], t['ours'])}) |",
    ]


def bench_gpt(repeats: int) -> list[str]:
    return speed_rows(interleaved_times(gpt_steps(), repeats), BATCH * SEQ, "ours (GPT, SDPA)",
                      "Hugging Face GPT2LMHeadModel")


def bench_neo(repeats: int, batch: int, seq: int) -> list[str]:
    steps, logit_diff = neo_steps(batch, seq)
    rows = speed_rows(interleaved_times(steps, repeats), batch * seq, "ours (GPT-3 Small, alternating)",
                      "Hugging Face GPTNeoForCausalLM (eager)")
    return [f"same weights, max |logit difference| before training {logit_diff:.2e}", ""] + rows


def init_single_process_group(device: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():  # DeepSpeed's MoE asks the process group for its expert groups
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)


def switch_at_revision(rev: str) -> type[nn.Module]:
    """SwitchFFN as of git revision `rev` (its moe.py and experts.py), loaded beside the working tree's, so a
    change to the layer is timed against the old one in the same process, interleaved."""
    import importlib.util

    modules = {}
    for name in ("experts", "moe"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:trainer/model/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        module_name = f"baseline_{name}"
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader=None))
        sys.modules[module_name] = module  # dataclasses look their module up
        exec(compile(source.replace("trainer.model.experts", "baseline_experts"), f"{rev}:{name}.py", "exec"),
             module.__dict__)
        modules[name] = module
    return modules["moe"].SwitchFFN


def moe_step(impl: str, num_experts: int, device: str = "cpu",
             baseline: Optional[type[nn.Module]] = None) -> tuple[Callable[[], None], nn.Module]:
    """One forward + backward of a layer on MOE_TOKENS tokens, loss = mean(y^2) + aux. impl "baseline" is
    `baseline`'s SwitchFFN (switch_at_revision), built from the same seed as ours."""
    torch.manual_seed(0)
    x = torch.randn(MOE_TOKENS, MOE_HIDDEN, device=device, requires_grad=True)
    if impl in ("ours", "baseline"):
        layer = (SwitchFFN if impl == "ours" else baseline)(MOE_HIDDEN, MOE_FF, MoEConfig(
            num_experts=num_experts, capacity_factor=CAPACITY))
    elif impl == "dense":  # the FFN one expert is: the FLOPs per token a top-1 Switch layer does, without routing
        layer = nn.Sequential(nn.Linear(MOE_HIDDEN, MOE_FF), nn.GELU(approximate="tanh"),
                              nn.Linear(MOE_FF, MOE_HIDDEN))
    else:
        import deepspeed.utils.logging
        from deepspeed.moe.layer import MoE

        deepspeed.utils.logging.logger.setLevel("WARNING")
        init_single_process_group(device)
        expert = nn.Sequential(nn.Linear(MOE_HIDDEN, MOE_FF), nn.GELU(approximate="tanh"),
                               nn.Linear(MOE_FF, MOE_HIDDEN))
        layer = MoE(MOE_HIDDEN, expert, num_experts=num_experts, ep_size=1, k=1,
                    capacity_factor=CAPACITY, use_rts=False)
    layer.to(device)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        if impl == "dense":
            y, aux = out, 0.0
        else:
            y, aux = (out[0], out[1]) if impl == "deepspeed" else (out[0], out[1].aux_loss)
        (y.square().mean() + aux).backward()
    return step, layer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_peak_memory(impl: str, num_experts: int) -> int:
    """Peak resident bytes one step adds over the weights, gradients included (run in a fresh process)."""
    step, layer = moe_step(impl, num_experts)
    step()
    layer.zero_grad(set_to_none=True)  # the measured step allocates its gradients afresh
    base = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    return peak_rss_bytes() - base


def peak_memory_in_subprocess(impl: str, num_experts: int, threads: int) -> int:
    # A fixed threshold turns off glibc's adaptive one, so large buffers are mmapped and unmapped on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--memory-case", impl, str(num_experts), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def cuda_peak_memory(impl: str, num_experts: int) -> int:
    """Peak allocated bytes one step adds over the weights, gradients included (max_memory_allocated)."""
    step, layer = moe_step(impl, num_experts, "cuda")
    step()
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bandwidth_probes(nbytes: int = 2**28) -> dict[str, Callable[[], None]]:
    """A read (sum) and a write (fill) of `nbytes`, timed in the layers' rounds: the memory bandwidth the
    expert weights and their gradients stream at, under the same load."""
    src, dst = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    return {"read": lambda: src.sum(), "write": lambda: dst.fill_(0.5)}


def weight_traffic_seconds(num_experts: int, t: dict[str, Timing], nbytes: int = 2**28) -> float:
    """The floor the expert weights put on a step: forward and backward each read w_fc and w_proj, and the
    backward writes their gradients (2 reads + 1 write of the weights), none of which fit in cache at 128 experts."""
    weights = num_experts * 2 * MOE_HIDDEN * MOE_FF * 4
    return weights * (2 * t["read"].median + t["write"].median) / nbytes


def max_grad_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest difference between the two layers' parameter gradients, relative to each gradient's largest entry."""
    return max(((pa.grad - pb.grad).abs().max() / pb.grad.abs().max()).item()
               for pa, pb in zip(a.parameters(), b.parameters()))


def bench_moe(repeats: int, threads: int, device: str = "cpu", memory: bool = True,
              baseline_rev: Optional[str] = None) -> list[str]:
    unit, u = (1e6, "us") if device == "cuda" else (1e3, "ms")  # microseconds on a GPU, milliseconds on CPU
    header = [f"experts | ours {u} (median / best) | DeepSpeed {u} (median / best) | speed ratio DS/ours "
              f"(median / best / paired)"]
    if memory:
        header.append("ours peak MiB | DeepSpeed peak MiB | memory ratio DS/ours")
    header.append(f"dense FFN {u} (median) | ours / dense FFN (paired, rounds)")
    if device == "cpu":
        header.append("weight traffic ms (2 reads + 1 write) | traffic / dense FFN")
    if baseline_rev:
        header.append(f"ours at {baseline_rev} {u} (median) | ours / ours at {baseline_rev} (paired, rounds) | "
                      f"max gradient difference (relative)")
    baseline = switch_at_revision(baseline_rev) if baseline_rev else None
    rows = ["| " + " | ".join(header) + " |", "|---" * (" | ".join(header).count("|") + 1) + "|"]
    for e in EXPERT_COUNTS:
        impls = ("ours", "deepspeed", "dense") + (("baseline",) if baseline else ())
        layers = {impl: moe_step(impl, e, device, baseline) for impl in impls}
        steps = {impl: step for impl, (step, _) in layers.items()}
        t = interleaved_times({**steps, **(bandwidth_probes() if device == "cpu" else {})}, repeats, device=device)
        ours, ds, dense = t["ours"], t["deepspeed"], t["dense"]
        row = [f"{e} | {ours.median * unit:.0f} / {ours.best * unit:.0f} | {ds.median * unit:.0f} / "
               f"{ds.best * unit:.0f} | {ds.median / ours.median:.2f} / {ds.best / ours.best:.2f} / "
               f"{paired_ratio(ds, ours):.2f}"]
        if memory:
            mem = {impl: cuda_peak_memory(impl, e) if device == "cuda" else peak_memory_in_subprocess(impl, e, threads)
                   for impl in ("ours", "deepspeed")}
            row.append(f"{mem['ours'] / 2**20:.1f} | {mem['deepspeed'] / 2**20:.1f} | "
                       f"{mem['deepspeed'] / mem['ours']:.2f}")
        row.append(f"{dense.median * unit:.0f} | {paired_ratio(ours, dense):.2f} ({round_range(ours, dense)})")
        if device == "cpu":
            traffic = weight_traffic_seconds(e, t)
            row.append(f"{traffic * 1e3:.0f} | {traffic / dense.median:.2f}")
        if baseline:
            row.append(f"{t['baseline'].median * unit:.0f} | {paired_ratio(ours, t['baseline']):.2f} "
                       f"({round_range(ours, t['baseline'])}) | "
                       f"{max_grad_difference(layers['ours'][1], layers['baseline'][1]):.1e}")
        rows.append("| " + " | ".join(row) + " |")
    return rows


def round_range(slow: Timing, fast: Timing) -> str:
    ratios = [a / b for a, b in zip(slow.samples, fast.samples)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["gpt", "neo", "moe", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--neo-batch", type=int, default=NEO_BATCH)
    parser.add_argument("--neo-seq", type=int, default=NEO_SEQ)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the Switch layer part only")
    parser.add_argument("--skip-memory", action="store_true", help="Switch part: no peak-memory subprocesses")
    parser.add_argument("--baseline", metavar="REV", help="Switch part: also time our layer as of git revision REV")
    parser.add_argument("--default-malloc", action="store_true", help="time without trainer.malloc's setting")
    parser.add_argument("--memory-case", nargs=2, metavar=("IMPL", "EXPERTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        impl, experts = args.memory_case
        print(json.dumps({"peak_bytes": measure_peak_memory(impl, int(experts))}))
        return
    # The trainer keeps freed heap memory on CPU (trainer/malloc.py); the timed runs do the same for
    # both implementations, in one process. --default-malloc times glibc's default behaviour.
    malloc = "glibc default" if args.default_malloc else (
        "freed memory kept, as the trainer does on CPU" if keep_freed_memory() else "glibc default (no mallopt)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} interleaved repeats after warm-up; "
          f"allocator: {malloc}; load average at start {load} on {os.cpu_count()} CPUs\n")
    if args.part in ("gpt", "all"):
        print(f"GPT training step: {GPT_SHAPE['n_layer']} layers, d_model {GPT_SHAPE['d_model']}, "
              f"{GPT_SHAPE['n_head']} heads, batch {BATCH} x seq {SEQ}, vocab {GPT_SHAPE['vocab_size']}, fp32, AdamW")
        print("\n".join(bench_gpt(args.repeats)) + "\n")
    if args.part in ("neo", "all"):
        print(f"GPT-3 Small training step ({GPT3_SMALL.name}: alternating dense / banded attention, window 256), "
              f"batch {args.neo_batch} x seq {args.neo_seq}, fp32, AdamW")
        print("\n".join(bench_neo(args.repeats, args.neo_batch, args.neo_seq)) + "\n")
    if args.part in ("moe", "all"):
        print(f"Switch layer forward+backward: top-1, capacity factor {CAPACITY}, hidden {MOE_HIDDEN}, "
              f"expert d_ff {MOE_FF}, {MOE_TOKENS} tokens")
        print("\n".join(bench_moe(args.repeats, args.threads, args.device, not args.skip_memory, args.baseline)))


if __name__ == "__main__":
    main()
