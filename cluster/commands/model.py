"""`pretrain model info CONFIG`: parameter counts, training FLOPs per token and per-GPU memory
at each ZeRO stage, computed analytically (no model is built, so 175B answers instantly)."""
from __future__ import annotations

import argparse
import inspect
import json

GIB = 1024**3


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="inspect a model config")
    msub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    from trainer.model.counting import flops_per_token

    info = msub.add_parser(
        "info", help="parameter counts, FLOPs per token, memory per GPU at ZeRO stages 0-3",
        description=__doc__.split("\n\n")[0] + "\n\nFLOPs per token: " + inspect.getdoc(flops_per_token),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("config", help="a model YAML (configs/model/...) or a train YAML")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set n_layer=4 (repeatable)")
    info.add_argument("--dp", type=int, default=8, help="data-parallel size for the memory table (default 8)")
    info.add_argument("--ep", type=int, default=1, help="expert-parallel size for the memory table (default 1)")
    info.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: n_ctx)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def model_info(cfg, dp: int, ep: int, precision: str, seq_len: int | None) -> dict:
    from trainer.model.counting import flops_per_token, param_counts
    from trainer.zero_memory import memory_per_gpu

    counts = param_counts(cfg)
    memory = {}
    for stage in range(4):
        est = memory_per_gpu(cfg, zero_stage=stage, dp_size=dp, ep_size=ep, precision=precision)
        memory[f"zero{stage}"] = {"weights": est.weights, "grads": est.grads,
                                  "optimizer": est.optimizer, "total": est.total}
    return {
        "name": cfg.name,
        "params_total": counts.total,
        "params_active": counts.active,
        "params_non_embedding": counts.non_embedding,
        "params_embedding": counts.embedding,
        "params_expert": counts.expert,
        "flops_per_token": flops_per_token(cfg, seq_len),
        "seq_len": seq_len or cfg.n_ctx,
        "memory_per_gpu_bytes": memory,
        "memory_assumptions": {"dp_size": dp, "ep_size": ep, "precision": precision},
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def run_info(args: argparse.Namespace) -> int:
    from cluster.configio import ConfigError, load_model_config

    cfg = load_model_config(args.config, args.overrides)
    if args.dp < 1 or args.ep < 1:
        raise ConfigError(f"--dp {args.dp} / --ep {args.ep}: both must be >= 1")
    if problem := cfg.expert_parallel_error(args.ep, args.dp):
        raise ConfigError(f"--ep: {problem}")
    info = model_info(cfg, args.dp, args.ep, args.precision, args.seq_len)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_table(info)
    return 0


def _print_table(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    params = Table(title=f"{info['name']}: parameters and compute", show_header=False)
    params.add_row("parameters, total", _human(info["params_total"]))
    params.add_row("active per token", _human(info["params_active"]))
    params.add_row("non-embedding", _human(info["params_non_embedding"]))
    if info["params_expert"]:
        params.add_row("in experts", _human(info["params_expert"]))
    params.add_row(f"training FLOPs per token (seq {info['seq_len']})", _human(info["flops_per_token"]))
    console.print(params)
    a = info["memory_assumptions"]
    mem = Table(title=f"memory per GPU, GiB (dp={a['dp_size']}, ep={a['ep_size']}, {a['precision']} + Adam; "
                      "no activations)")
    for col in ("ZeRO stage", "weights", "grads", "optimizer", "total"):
        mem.add_column(col, justify="right")
    for stage, m in info["memory_per_gpu_bytes"].items():
        mem.add_row(stage.removeprefix("zero"), *(f"{m[k] / GIB:.2f}" for k in ("weights", "grads", "optimizer", "total")))
    console.print(mem)
