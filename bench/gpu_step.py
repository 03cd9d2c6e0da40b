"""GPT-3 Small training step on a GPU: ours against Hugging Face GPT2LMHeadModel, same run.

For configs/model/gpt3-125m.yaml (12 layers, d_model 768, 12 heads, context 2048) at micro batch
8 x 2048: forward, backward and a fused AdamW step in bf16 autocast over fp32 weights, our GPT with
dense causal attention (is_causal, so SDPA can take the flash kernel) and as configured (GPT-3's
alternating dense / banded layers: the band is a mask, which flash cannot take), against
GPT2LMHeadModel of the same shape (SDPA attention), steps interleaved after warm-up. Prints
tokens/s, MFU against the GPU's datasheet bf16 peak (trainer.metrics.device_peak, the trainer's
own MFU) with the FLOPs of `pretrain model info` (6N + attention), peak memory, and which SDPA
kernels each model can run on (tried with only that backend allowed).

    python bench/gpu_step.py [--steps 10] [--micro 8] [--seq 2048] [--json OUT]
    python bench/gpu_step.py --device cpu --tiny     # a smoke run of the same code on CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from cluster.configio import load_model_config  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.model.counting import flops_per_token, param_counts  # noqa: E402
from trainer.model.hf import hf_config, load_hf_state_dict  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: str) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        opt.step()
    return step


def sdpa_backends(model: torch.nn.Module, x: torch.Tensor, device: str) -> list[str]:
    """The SDPA backends a forward of `model` runs on when each is the only one allowed."""
    usable = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with torch.no_grad(), sdpa_kernel([backend]), torch.autocast(device, dtype=torch.bfloat16):
                model(x[:1])
            usable.append(backend.name)
        except RuntimeError:
            pass
    return usable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="configs/model/tiny-gpt.yaml instead (smoke test)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = args.device
    from trainer.metrics import device_peak
    from transformers import GPT2LMHeadModel

    cfg = load_model_config(REPO / "configs" / "model" / ("tiny-gpt.yaml" if args.tiny else "gpt3-125m.yaml"))
    seq = min(args.seq, cfg.n_ctx)
    dense_cfg = cfg.model_copy(update={"attention": "dense"})
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config(dense_cfg)).to(device)
    dense = GPT(dense_cfg)
    load_hf_state_dict(dense, hf.state_dict())
    configured = GPT(cfg)
    configured.load_state_dict(dense.state_dict())  # same weights; only the attention pattern differs
    models = {"ours, dense attention": dense.to(device), f"ours, {cfg.attention} attention": configured.to(device)}
    models["Hugging Face GPT2LMHeadModel (SDPA)"] = hf
    data = torch.randint(0, cfg.vocab_size, (args.micro, seq + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def hf_loss() -> torch.Tensor:
        logits = hf(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = make_step(model, hf_loss if model is hf else (lambda m=model: m(x, targets=y).loss), device)
    backends = {name: sdpa_backends(m, x, device) for name, m in models.items()} if device == "cuda" else {}

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peak_mem: dict[str, int] = {}
    for i in range(args.steps):
        for name, step in steps.items():
            if device == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device == "cuda" and i == 0:
                peak_mem[name] = torch.cuda.max_memory_allocated()

    peak, peak_source = device_peak("bf16")
    tokens = args.micro * seq
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "config": cfg.name, "params": param_counts(cfg).total, "micro_batch": args.micro, "seq_len": seq,
               "peak_flops": peak, "peak_source": peak_source, "models": {}}
    for name, t in times.items():
        model_cfg = cfg if name.startswith(f"ours, {cfg.attention}") else dense_cfg
        median = statistics.median(t)
        tps = tokens / median
        results["models"][name] = {
            "step_ms_median": round(median * 1e3, 2), "step_ms_best": round(min(t) * 1e3, 2),
            "tokens_per_s": round(tps), "mfu": round(tps * flops_per_token(model_cfg, seq) / peak, 4),
            "peak_memory_gib": round(peak_mem[name] / 2**30, 2) if name in peak_mem else None,
            "sdpa_backends": backends.get(name)}
    hf_name = "Hugging Face GPT2LMHeadModel (SDPA)"
    for name in models:
        if name != hf_name:
            results["models"][name]["speed_vs_hf"] = round(results["models"][hf_name]["step_ms_median"]
                                                           / results["models"][name]["step_ms_median"], 3)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
