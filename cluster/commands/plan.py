"""`pretrain plan CONFIG --gpus N --gpu-memory-gb M`: a parallel layout that fits (ZeRO stage,
expert-parallel size, micro batch, gradient accumulation, activation checkpointing), the memory per
GPU it needs and the step time at an assumed MFU; or why nothing fits. Exits 1 when infeasible."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose a parallel layout that fits N GPUs", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a model YAML or a train YAML (its seq_len, batch and precision are used)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (every GPU is a data-parallel rank)")
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU, GB (1e9 bytes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--seq-len", type=int, help="input length (an encoder-decoder's encoder input); default: "
                                                "train.seq_len, else the model's n_ctx")
    p.add_argument("--global-batch", type=int, help="sequences per step; default: train.global_batch_size, "
                                                      "else GPT-3's batch for the model's size")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: train.precision, else bf16")
    p.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default: cluster.assumed_mfu, 0.4)")
    p.add_argument("--gpu-tflops", type=float, help="peak TFLOP/s of one GPU (default: cluster.gpu_tflops, 312)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_plan)


def plan_from_args(args: argparse.Namespace):
    from cluster.config import ClusterConfig
    from cluster.configio import load_model_or_run
    from cluster.errors import ClusterError
    from cluster.plan import make_plan

    if args.gpus < 1 or args.gpu_memory_gb <= 0:
        raise ClusterError("--gpus must be >= 1 and --gpu-memory-gb > 0")
    model, run = load_model_or_run(args.config, args.overrides)
    train, cluster = (run.train, run.cluster) if run else (None, ClusterConfig())
    return make_plan(model, args.gpus, args.gpu_memory_gb, seq_len=args.seq_len,
                     global_batch=args.global_batch or (train.global_batch_size if train else None),
                     precision=args.precision or (train.precision if train else "bf16"),
                     mfu=args.mfu or cluster.assumed_mfu, gpu_tflops=args.gpu_tflops or cluster.gpu_tflops,
                     train=train)


def format_plan(plan) -> str:
    seq = f"seq {plan.seq_len}"
    if plan.tokens_per_sequence != plan.seq_len or plan.targets_len != plan.seq_len:  # an encoder-decoder's example
        seq = f"inputs {plan.seq_len}, targets {plan.targets_len} from {plan.tokens_per_sequence} raw tokens"
    head = (f"{plan.model} on {plan.gpus} x {plan.gpu_memory_gb:g} GB GPUs: {seq}, global batch "
            f"{plan.global_batch_size} sequences ({plan.global_batch_size * plan.tokens_per_sequence / 1e6:.2f}M "
            f"tokens), {plan.precision}")
    lay, mem = plan.layout, plan.memory
    rows = [("weights", mem.weights), ("gradients", mem.grads), ("optimizer states", mem.optimizer),
            ("activations", mem.activations), ("MoE all-to-all buffers", mem.moe_all_to_all),
            ("communication buffers", mem.buffers), ("training step", mem.step),
            ("building the model", mem.construction), ("saving a checkpoint", mem.checkpoint_save),
            ("peak", mem.total)]
    table = "\n".join(f"    {name:24} {value / 1e9:10.2f} GB" for name, value in rows)
    layout = (f"ZeRO-{lay.zero_stage}, expert parallel {lay.ep_size}, data parallel {lay.dp_size}, micro batch "
              f"{lay.micro_batch_size}, gradient accumulation {lay.gradient_accumulation_steps}, activation "
              f"checkpointing {'on' if lay.activation_checkpointing else 'off'}")
    lines = [head]
    if plan.feasible:
        lines += [f"  layout: {layout}",
                  f"  memory per GPU (budget {plan.budget_bytes / 1e9:.1f} GB):", table,
                  f"  step time: {plan.step_time_s:.2f} s ({plan.flops_per_step / 1e15:.1f} PFLOP per step at MFU "
                  f"{plan.assumed_mfu:g} of {plan.gpu_tflops:g} TFLOP/s per GPU), {plan.tokens_per_s:,.0f} tokens/s",
                  f"  why: {plan.reason}",
                  f"  use: {' '.join('--set ' + s for s in plan.overrides())}"]
    else:
        lines += [f"  INFEASIBLE: {plan.reason}", f"  smallest layout tried: {layout}", table]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.feasible else 1
