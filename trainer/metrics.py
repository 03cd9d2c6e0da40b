"""Per-step metrics: RUN/metrics.jsonl (keys in DESIGN.md), wandb (offline unless configured), and a
one-line progress display. Only rank 0 writes; every key is a plain number or list of numbers.

MFU = model FLOPs per token (`trainer.model.counting.flops_per_token`, the `pretrain model info`
figure) x tokens/s of the whole run / the peak of every rank together. GPUs use their datasheet peak
for the training precision (`GPU_PEAKS`; `logging.peak_flops` overrides it). A CPU has no datasheet
figure we can trust, so every rank measures a matmul at start-up, all at once and with the threads it
trains with (ranks on one machine share its cores), and the peaks are summed; the log says so.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
import torch
import torch.distributed as dist

from trainer.config import RunConfig

log = logging.getLogger(__name__)

# Datasheet dense (no sparsity) tensor-core peaks, FLOP/s, by precision, matched against
# torch.cuda.get_device_name() in this order (the more specific names first). fp32 is the non-tensor-core rate.
GPU_PEAKS = {"H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
             "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
             "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
             "H800": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
             "GH200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
             "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
             "A800": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
             "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
             "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
             "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
             "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
             "V100": {"fp16": 125e12, "fp32": 15.7e12}}


def gpu_datasheet_peak(name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks.get(precision)
    return None


def measure_cpu_peak(seconds: float = 0.5, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n x n matmul over a short loop: an achievable peak for this CPU and thread count."""
    g = torch.Generator().manual_seed(0)  # leaves the training RNG alone: resume must stay exact
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    a @ b  # warm-up (thread pool, caches)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def device_peak(precision: str, override: float | None = None) -> tuple[float, str]:
    """(FLOP/s of this process's device, where the figure comes from)."""
    if override:
        return override, "logging.peak_flops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_datasheet_peak(name, precision)
        if peak:
            return peak, f"{name} datasheet {precision} peak"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        a @ a
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0), \
            f"{name}: not in GPU_PEAKS, measured by an 8192^2 {precision} matmul (set logging.peak_flops)"
    # CPUs without bf16 units run bf16 matmuls far slower than fp32; the faster of the two is the peak.
    dtypes = [torch.float32] + ([torch.bfloat16] if precision == "bf16" else [])
    peak = max(measure_cpu_peak(dtype=d) for d in dtypes)
    kinds = " and ".join(dict.fromkeys([precision, "fp32"]))  # bf16 runs try both; fp32 runs one
    return peak, f"measured by a matmul at start-up, best of {kinds} ({torch.get_num_threads()} threads)"


def world_peak(precision: str, override: float | None = None) -> tuple[float, str]:
    """Collective when distributed: the sum of every rank's peak, the CPU ones measured by all ranks at
    once (measured alone, a rank would have the cores its peers train on to itself)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return device_peak(precision, override)
    dist.barrier()
    peak, source = device_peak(precision, override)
    total = torch.tensor([peak], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")  # NCCL reduces GPU tensors only
    dist.all_reduce(total)
    return float(total.item()), f"sum over {dist.get_world_size()} ranks, each {source}"


def moe_fields(layers: list[int], counts: torch.Tensor, dropped: torch.Tensor, aux_loss: float, z_loss: float) -> dict:
    """Per MoE layer: expert load (fraction of routed tokens per expert, from counts[layer, expert])
    and the fraction of tokens dropped for being over capacity."""
    loads = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    dropped_list = [round(float(x), 5) for x in dropped]
    return {"aux_loss": aux_loss, "z_loss": z_loss, "dropped_frac": sum(dropped_list) / len(dropped_list),
            "dropped_frac_per_layer": dropped_list, "moe_layers": [int(x) for x in layers],
            "expert_load": [[round(float(x), 4) for x in row] for row in loads]}


def wandb_fields(record: dict) -> dict:
    """The record as wandb series: the per-layer MoE lists become one series per expert and per layer
    (wandb charts scalars; a list would be dropped), keyed by the model's layer index."""
    fields = {k: v for k, v in record.items() if not isinstance(v, list)}
    layers = record.get("moe_layers") or []
    for layer, loads in zip(layers, record.get("expert_load") or []):
        fields.update({f"moe/layer{layer}/expert{j}_load": load for j, load in enumerate(loads)})
    for layer, dropped in zip(layers, record.get("dropped_frac_per_layer") or []):
        fields[f"moe/layer{layer}/dropped_frac"] = dropped
    return fields


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: RunConfig, flops_per_token: float, enabled: bool, resumed: bool):
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak, self.peak_source = world_peak(cfg.train.precision, cfg.logging.peak_flops)
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        log.info("MFU peak: %.1f GFLOP/s, %s", self.peak / 1e9, self.peak_source)
        self.over_peak_warned = False
        self.file = open(self.path, "a")
        self.wandb = self._start_wandb(run_dir, cfg, resumed)

    def _start_wandb(self, run_dir: Path, cfg: RunConfig, resumed: bool):
        lc = cfg.logging
        # An explicit `disabled` in the config wins; otherwise the user's WANDB_MODE does.
        mode = "disabled" if lc.wandb_mode == "disabled" else os.environ.get("WANDB_MODE", lc.wandb_mode)
        if mode == "disabled":
            return None
        import wandb

        # The config we log is the run config: it never holds the API key (wandb reads that from its own env).
        return wandb.init(project=os.environ.get("WANDB_PROJECT", lc.wandb_project),
                          entity=os.environ.get("WANDB_ENTITY", lc.wandb_entity), name=lc.run_name or run_dir.name,
                          dir=str(run_dir), mode=mode, config=cfg.model_dump(mode="json"),
                          resume="allow" if resumed else None, id=_wandb_id(run_dir),
                          settings=wandb.Settings(quiet=True))  # its banner and summary stay in RUN/wandb

    def log(self, record: dict, step_seconds: float, step_tokens: int) -> dict:
        tps = step_tokens / step_seconds if step_seconds > 0 else 0.0
        mfu = tps * self.flops_per_token / self.peak if self.peak else None
        if mfu is not None and mfu > 1 and self.enabled and not self.over_peak_warned:
            self.over_peak_warned = True  # recorded as measured: a figure above 1 means the peak was measured wrong
            log.warning("step %s: MFU %.2f is above 1: the peak (%s) was measured too low, e.g. while the machine "
                        "was busier than during training; set logging.peak_flops", record.get("step"), mfu,
                        self.peak_source)
        record = {**record, "tokens_per_s": round(tps, 1), "mfu": round(mfu, 5) if mfu is not None else None}
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.wandb is not None:
                self.wandb.log(wandb_fields(record), step=record["step"])
        return record

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """Stable per run dir, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb" / "run-id"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = f"{run_dir.name[:40]}-{os.urandom(4).hex()}"
    path.write_text(run_id)
    return run_id


def progress_line(r: dict, max_steps: int) -> str:
    parts = [f"step {r['step']}/{max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"gnorm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "gnorm -",
             f"{r['tokens_per_s']:,.0f} tok/s", f"mfu {100 * r['mfu']:.2f}%" if r.get("mfu") is not None else ""]
    if "aux_loss" in r:
        parts.append(f"aux {r['aux_loss']:.3f} z {r['z_loss']:.3f} drop {100 * r['dropped_frac']:.1f}%")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return "  ".join(p for p in parts if p)


def flops_for(cfg: RunConfig) -> float:
    from trainer.model.counting import flops_per_token

    return flops_per_token(cfg.model, train=cfg.train)  # per raw token: what tokens/s counts
