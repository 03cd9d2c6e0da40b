"""GPT-3's banded attention and the chunked loss on this CPU, each against what it replaced, in one run.

(a) attention: one GPT-3 Small attention layer (768 wide, 12 heads) at T = 2048, forward + backward:
    the dense causal layer, the banded layer (window 256) blocked (trainer/model/local_attention.py)
    and the banded layer through the old (T, T) mask; the whole layer (projections included) and the
    attention alone. Interleaved rounds after warm-up; ratios are the median of per-round ratios,
    with their spread over the rounds.
(b) memory: a GPT-3 Small (configs/model/gpt3-125m.yaml) forward + backward on a 2 x 2048 micro
    batch in fp32, chunked loss vs full logits, each in a fresh child process: peak resident set
    above the level before the model was built (trainer/memory.py). Minutes per variant on 2 cores.

    python bench/banded_and_loss.py [--part attention|memory|all] [--repeats N] [--threads N]
    python bench/banded_and_loss.py --part attention --device cuda [--flex]   # on a GPU, bf16 by default

On a GPU (--device cuda) the attention part runs in bf16 (as training does; --dtype fp32 to override),
and --flex adds FlexAttention with a sliding-window block mask (compiled; it has no backward on CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model_step import interleaved_times  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from cluster.configio import load_model_config  # noqa: E402
from trainer.model.attention import Attention, banded_causal_mask  # noqa: E402
from trainer.model.local_attention import banded_attention  # noqa: E402

SEQ, WINDOW, BATCH = 2048, 256, 1
GPT3_SMALL = REPO / "configs/model/gpt3-125m.yaml"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def flex_banded(window: int, device: str) -> Callable[..., torch.Tensor]:
    """FlexAttention over the band (compiled, as it must be to be fused), same semantics as the mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(band, None, None, SEQ, SEQ, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def attention_steps(device: str = "cpu", dtype: torch.dtype = torch.float32,
                    flex_fn: Optional[Callable[..., torch.Tensor]] = None) -> dict[str, Callable[[], None]]:
    """Forward + backward of each variant on the same input, layer-level and attention-only."""
    cfg = load_model_config(GPT3_SMALL)
    torch.manual_seed(0)
    dense, banded = Attention(cfg), Attention(cfg, window=WINDOW)
    banded.load_state_dict(dense.state_dict())
    dense, banded = dense.to(device, dtype), banded.to(device, dtype)
    x = torch.randn(BATCH, SEQ, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (torch.randn(BATCH, cfg.n_head, SEQ, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def masked_layer(inp):  # the band as the old code passed it: SDPA over the whole (T, T) mask
        q_, k_, v_ = banded.project(inp, None, None)
        y = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=banded_causal_mask(SEQ, WINDOW, inp.device))
        return banded.c_proj(y.transpose(1, 2).reshape(BATCH, SEQ, banded.inner))

    def step(fn):
        return lambda: fn().sum().backward()

    return {
        "layer dense causal": step(lambda: dense(x)),
        "layer banded blocked": step(lambda: banded(x)),
        "layer banded masked": step(lambda: masked_layer(x)),
        "attention dense causal": step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "attention banded blocked": step(lambda: banded_attention(q, k, v, WINDOW)),
        "attention banded masked": step(lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=banded_causal_mask(SEQ, WINDOW, q.device))),
    } | ({"attention banded flex": step(lambda: flex_fn(q, k, v))} if flex_fn else {})


def ratio_line(times, name: str, base: str) -> str:
    ratios = [a / b for a, b in zip(times[name].samples, times[base].samples)]
    return (f"| {name} / {base} | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")


def flex_difference(flex_fn: Callable[..., torch.Tensor], device: str, dtype: torch.dtype) -> float:
    """Largest |flex - masked SDPA| on random inputs: the two must compute the same band."""
    cfg = load_model_config(GPT3_SMALL)
    q, k, v = (torch.randn(BATCH, cfg.n_head, SEQ, cfg.head_dim, device=device, dtype=dtype) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=banded_causal_mask(SEQ, WINDOW, q.device))
    return (flex_fn(q, k, v) - ref).abs().max().item()


def bench_attention(repeats: int, device: str = "cpu", dtype_name: str = "fp32", flex: bool = False) -> list[str]:
    dtype = DTYPES[dtype_name]
    flex_fn = flex_banded(WINDOW, device) if flex else None
    t = interleaved_times(attention_steps(device, dtype, flex_fn), repeats, device=device)
    lines = [f"{device}, {dtype_name}", "",
             "| variant (fwd+bwd, T=2048, W=256) | median s | best s |", "|---|---:|---:|"]
    lines += [f"| {name} | {timing.median:.5f} | {timing.best:.5f} |" for name, timing in t.items()]
    lines += ["", "| paired ratio | median | spread (min-max over rounds) |", "|---|---:|---:|"]
    for kind in ("layer", "attention"):
        lines.append(ratio_line(t, f"{kind} banded blocked", f"{kind} dense causal"))
        lines.append(ratio_line(t, f"{kind} banded masked", f"{kind} dense causal"))
        lines.append(ratio_line(t, f"{kind} banded blocked", f"{kind} banded masked"))
    if flex:
        lines.append(ratio_line(t, "attention banded flex", "attention dense causal"))
        lines.append(ratio_line(t, "attention banded flex", "attention banded blocked"))
        lines.append(f"\nflex vs the masked reference: max |difference| {flex_difference(flex_fn, device, dtype):.2e}")
    return lines


def memory_child(chunk: int) -> None:
    """One GPT-3 Small forward + backward in this process; prints the peak above the pre-model level."""
    from trainer.memory import PeakMemory
    from trainer.model import GPT

    cfg = load_model_config(GPT3_SMALL).model_copy(update={"loss_chunk_tokens": chunk})
    data = torch.randint(0, cfg.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the same weights in both children: their losses must agree
    peak = PeakMemory("cpu")
    model = GPT(cfg)
    out = model(data[:, :-1], targets=data[:, 1:])
    out.loss.backward()
    print(json.dumps({"loss_chunk_tokens": chunk, "loss": out.loss.item(), "peak_bytes": peak.peak()}))


def bench_memory(threads: int) -> list[str]:
    lines = ["| loss | peak RSS above pre-model level | loss value |", "|---|---:|---:|"]
    results = {}
    for chunk in (ModelConfig.model_fields["loss_chunk_tokens"].default, 0):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(chunk), "--threads", str(threads)],
                             capture_output=True, text=True, check=True)
        results[chunk] = r = json.loads(out.stdout.strip().splitlines()[-1])
        name = f"chunked ({chunk} tokens)" if chunk else "full logits"
        lines.append(f"| {name} | {r['peak_bytes'] / 1e9:.2f} GB | {r['loss']:.6f} |")
    chunked, full = results.values()
    lines.append(f"| **saved** | **{(full['peak_bytes'] - chunked['peak_bytes']) / 1e9:.2f} GB** | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["attention", "memory", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="attention part only")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--flex", action="store_true", help="also FlexAttention's sliding window (cuda only)")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flex and args.device != "cuda":
        parser.error("--flex needs --device cuda: FlexAttention has no backward on CPU (torch 2.13)")
    if args.device == "cuda" and args.part != "attention":
        parser.error("--device cuda: only --part attention (the memory part measures CPU resident memory)")
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        return memory_child(args.memory_child)
    if args.part in ("attention", "all"):
        dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
        print("\n".join(bench_attention(args.repeats, args.device, dtype, args.flex)))
    if args.part in ("memory", "all"):
        print("\n".join(bench_memory(args.threads)))


if __name__ == "__main__":
    main()
