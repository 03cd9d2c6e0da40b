"""`pretrain plan CONFIG --gpus N --gpu-memory-gb M`: a parallel layout that fits (ZeRO stage,
expert-parallel size, micro batch, gradient accumulation, activation checkpointing), the memory per
GPU it needs, and the step time: compute at an assumed MFU plus the communication of the layout on the
hardware preset's NVLink and InfiniBand (cluster/comm.py); or why nothing fits. Exits 1 when infeasible."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose a parallel layout that fits N GPUs", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a model YAML or a train YAML (its seq_len, batch and precision are used)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (every GPU is a data-parallel rank)")
    p.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU, GB (1e9 bytes); default: "
                                                         "cluster.gpu_memory_gb, else the hardware preset's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--seq-len", type=int, help="input length (an encoder-decoder's encoder input); default: "
                                                "train.seq_len, else the model's n_ctx")
    p.add_argument("--global-batch", type=int, help="sequences per step; default: train.global_batch_size, "
                                                      "else GPT-3's batch for the model's size")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: train.precision, else bf16")
    p.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default: cluster.assumed_mfu, 0.4)")
    p.add_argument("--gpu-tflops", type=float, help="peak TFLOP/s of one GPU (default: cluster.gpu_tflops, else "
                                                      "the preset's)")
    p.add_argument("--hardware", help="GPU and network preset: a100-80gb (default), h100, h200 (cluster.hardware)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs sharing NVLink (default: cluster.gpus_per_node, else 8)")
    p.add_argument("--nvlink-gbps", type=float, help="GB/s per GPU inside a node (cluster.nvlink_gbps)")
    p.add_argument("--ib-gbps", type=float, help="GB/s per GPU between nodes (cluster.ib_gbps)")
    p.add_argument("--nvlink-latency-us", type=float, help="microseconds per collective call inside a node "
                                                             "(cluster.nvlink_latency_us)")
    p.add_argument("--ib-latency-us", type=float, help="microseconds per collective call spanning nodes "
                                                         "(cluster.ib_latency_us)")
    p.add_argument("--comm-overlap", type=float, help="fraction of compute time that ZeRO-3's prefetched "
                                                        "communication hides behind (cluster.comm_overlap, 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_plan)


def plan_from_args(args: argparse.Namespace):
    from cluster.config import ClusterConfig
    from cluster.configio import load_model_or_run
    from cluster.errors import ClusterError
    from cluster.plan import make_plan

    if args.gpus < 1 or (args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0):
        raise ClusterError("--gpus must be >= 1 and --gpu-memory-gb > 0")
    if args.comm_overlap is not None and not 0 <= args.comm_overlap <= 1:
        raise ClusterError(f"--comm-overlap: {args.comm_overlap} is not a fraction between 0 and 1")
    model, run = load_model_or_run(args.config, args.overrides)
    train, cluster = (run.train, run.cluster) if run else (None, ClusterConfig())
    try:
        hw = cluster.plan_hardware(hardware=args.hardware, gpu_tflops=args.gpu_tflops, nvlink_gbps=args.nvlink_gbps,
                                   ib_gbps=args.ib_gbps, nvlink_latency_us=args.nvlink_latency_us,
                                   ib_latency_us=args.ib_latency_us, gpus_per_node=args.gpus_per_node,
                                   gpu_memory_gb=args.gpu_memory_gb)
    except ValueError as e:  # an unknown preset or a figure <= 0, named
        raise ClusterError(f"--{str(e).replace('_', '-')}") from None
    overlap = cluster.comm_overlap if args.comm_overlap is None else args.comm_overlap
    return make_plan(model, args.gpus, hw.gpu_memory_gb, seq_len=args.seq_len,
                     global_batch=args.global_batch or (train.global_batch_size if train else None),
                     precision=args.precision or (train.precision if train else "bf16"),
                     mfu=args.mfu or cluster.assumed_mfu, train=train, hw=hw, comm_overlap=overlap)


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
    hpz = f" (ZeRO++ hpz {lay.zero_hpz_partition_size})" if lay.zero_hpz_partition_size > 1 else ""
    layout = (f"ZeRO-{lay.zero_stage}{hpz}, expert parallel {lay.ep_size}, data parallel {lay.dp_size}, micro batch "
              f"{lay.micro_batch_size}, gradient accumulation {lay.gradient_accumulation_steps}, activation "
              f"checkpointing {'on' if lay.activation_checkpointing else 'off'}")
    lines = [head]
    if plan.feasible:
        lines += [f"  layout: {layout}",
                  f"  memory per GPU (budget {plan.budget_bytes / 1e9:.1f} GB):", table,
                  f"  step time: {plan.step_time_s:.2f} s, {plan.tokens_per_s:,.0f} tokens/s, "
                  f"{plan.bound}-bound", *_time_lines(plan),
                  f"  why: {plan.reason}",
                  f"  use: {' '.join('--set ' + s for s in plan.overrides())}"]
    else:
        lines += [f"  INFEASIBLE: {plan.reason}", f"  smallest layout tried: {layout}", table]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _time_lines(plan) -> list[str]:
    hw = plan.hardware
    lines = [f"    compute                  {plan.compute_time_s:10.2f} s  ({plan.flops_per_step / 1e15:.1f} PFLOP at "
             f"MFU {plan.assumed_mfu:g} of {plan.gpu_tflops:g} TFLOP/s per GPU)"]
    for kind, seconds in plan.comm_s_by_kind.items():
        lines.append(f"    {kind.replace('_', ' '):24} {seconds:10.2f} s  "
                     f"({plan.comm_bytes_per_gpu_by_kind[kind] / 1e9:,.1f} GB per GPU in "
                     f"{plan.comm_calls_by_kind[kind]:,} calls)")
    lines.append(f"    communication            {plan.comm_time_s:10.2f} s  ({hw.name}: {hw.gpus_per_node} GPUs per node, "
                 f"NVLink {hw.nvlink_gbps:g} GB/s and {hw.nvlink_latency_us:g} us per call, InfiniBand "
                 f"{hw.ib_gbps:g} GB/s per GPU and {hw.ib_latency_us:g} us per call; ZeRO-3's prefetched "
                 f"collectives hide behind {plan.comm_overlap:.0%} of compute, the rest add)")
    return lines


def run_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.feasible else 1
