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
    info.add_argument("--seq-len", type=int, default=None,
                      help="sequence length (an encoder-decoder's input length) for FLOPs; default: a train "
                           "YAML's train.seq_len, else n_ctx")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def model_info(cfg, dp: int, ep: int, precision: str, seq_len: int | None, train=None) -> dict:
    """`train` (a TrainConfig) supplies the objective and sequence length FLOPs are counted for."""
    from trainer.model.counting import flops_per_example, param_counts, training_example
    from trainer.zero_memory import memory_per_gpu

    counts, example = param_counts(cfg), training_example(cfg, seq_len, train)
    memory = {}
    for stage in range(4):
        est = memory_per_gpu(cfg, zero_stage=stage, dp_size=dp, ep_size=ep, precision=precision)
        memory[f"zero{stage}"] = {"weights": est.weights, "grads": est.grads,
                                  "optimizer": est.optimizer, "total": est.total}
    moe = cfg.moe
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
    if cfg.arch == "encoder_decoder":
        moe_layers += sum(cfg.is_moe_layer(i) for i in range(cfg.encoder_layers))
    flops = flops_per_example(cfg, example)
    return {
        "name": cfg.name,
        "arch": cfg.arch,
        "n_layer": cfg.n_layer,  # decoder blocks
        "n_encoder_layer": cfg.encoder_layers if cfg.arch == "encoder_decoder" else 0,
        "num_experts": moe.num_experts if moe else 0,
        "moe_every": moe.every if moe else 0,
        "moe_layers": moe_layers,
        "params_total": counts.total,
        "params_active": counts.active,
        "params_non_embedding": counts.non_embedding,
        "params_embedding": counts.embedding,
        "params_expert": counts.expert,
        "flops_per_token": flops / example.raw_tokens,  # per raw token, as the trainer's MFU counts
        "flops_per_sequence": flops,
        "seq_len": example.inputs,
        "targets_len": example.targets,
        "tokens_per_sequence": example.raw_tokens,
        "memory_per_gpu_bytes": memory,
        "memory_assumptions": {"dp_size": dp, "ep_size": ep, "precision": precision},
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def run_info(args: argparse.Namespace) -> int:
    from cluster.configio import ConfigError, load_model_or_run

    cfg, run = load_model_or_run(args.config, args.overrides)
    if args.dp < 1 or args.ep < 1:
        raise ConfigError(f"--dp {args.dp} / --ep {args.ep}: both must be >= 1")
    if problem := cfg.expert_parallel_error(args.ep, args.dp):
        raise ConfigError(f"--ep: {problem}")
    info = model_info(cfg, args.dp, args.ep, args.precision, args.seq_len, run.train if run else None)
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
    if info["arch"] == "encoder_decoder":
        params.add_row("blocks", f"{info['n_encoder_layer']} encoder + {info['n_layer']} decoder")
    else:
        params.add_row("blocks", str(info["n_layer"]))
    if info["num_experts"]:
        params.add_row("experts", f"{info['num_experts']} in each of {info['moe_layers']} Switch layers")
    params.add_row("parameters, total", _human(info["params_total"]))
    params.add_row("active per token", _human(info["params_active"]))
    params.add_row("non-embedding", _human(info["params_non_embedding"]))
    if info["params_expert"]:
        params.add_row("in experts", _human(info["params_expert"]))
    if info["arch"] == "encoder_decoder":
        params.add_row("sequence", f"inputs {info['seq_len']}, targets {info['targets_len']} "
                                   f"({info['tokens_per_sequence']} raw tokens)")
        params.add_row("training FLOPs per raw token", _human(info["flops_per_token"]))
    else:
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
