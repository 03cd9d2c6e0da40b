"""Turns `pretrain submit` arguments into a `Job`: which kind, the resolved config, the cluster
layout (flags over --cluster FILE over the config's `cluster:` section over defaults)."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import yaml

from cluster.config import ClusterConfig
from cluster.configio import apply_overrides, is_train_yaml, load_config, load_run_config
from cluster.errors import ClusterError
from cluster.submit import Job, JobKind
from trainer.configio import dump_yaml, read_yaml, validate


def _overlay(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section: a cluster file's `k8s.requests` keeps the train YAML's `k8s.volume`."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _overlay(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def cluster_config(base: ClusterConfig, args: argparse.Namespace) -> ClusterConfig:
    values = base.model_dump()
    if args.cluster:
        values = _overlay(values, load_config(args.cluster, ClusterConfig).model_dump(exclude_unset=True))
    flags = {"backend": args.backend, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
             "address": args.address}
    values.update({k: v for k, v in flags.items() if v is not None})
    if values["backend"] == "local":
        raise ClusterError("no backend: pass --backend ray|slurm|k8s|ssh (or set cluster.backend)")
    return validate(ClusterConfig, values, "cluster settings")


def _absolute(path: str) -> str:
    """Relative data paths mean 'from where I ran the command': the cluster needs them absolute."""
    return path if "://" in path or Path(path).is_absolute() else str(Path(path).resolve())


def resolve_train(path: Path, args: argparse.Namespace) -> tuple[str, ClusterConfig, list[str]]:
    """(resolved YAML, cluster, overrides): with --plan, the planner's layout joins the overrides."""
    overrides = list(args.overrides)
    run = load_run_config(path, overrides)
    cluster = cluster_config(run.cluster, args)
    if args.plan:
        overrides += planned_layout(run, cluster)
        run = load_run_config(path, overrides)
    run.cluster = cluster
    run.data.path = _absolute(run.data.path)
    return dump_yaml(run), cluster, overrides


def planned_layout(run, cluster: ClusterConfig) -> list[str]:
    """The planner's layout for nodes x gpus_per_node GPUs as `--set` overrides; infeasible is an error."""
    from cluster.plan import make_plan

    if not cluster.gpus_per_node or not cluster.gpu_memory_gb:
        raise ClusterError("--plan needs GPUs: set cluster.gpus_per_node and cluster.gpu_memory_gb")
    plan = make_plan(run.model, cluster.nodes * cluster.gpus_per_node, cluster.gpu_memory_gb,
                     seq_len=run.train.seq_len, global_batch=run.train.global_batch_size,
                     precision=run.train.precision, mfu=cluster.assumed_mfu, train=run.train,
                     hw=cluster.plan_hardware(), comm_overlap=cluster.comm_overlap)
    if not plan.feasible:
        raise ClusterError(plan.reason)
    print(f"plan: {' '.join(plan.overrides())} ({plan.memory.total / 1e9:.1f} GB per GPU, "
          f"{plan.step_time_s:.2f} s per step at MFU {plan.assumed_mfu:g})", file=sys.stderr)
    return plan.overrides()


def resolve_data(path: Path, args: argparse.Namespace) -> tuple[str, ClusterConfig, list[str]]:
    """Validated by the pipeline's own schema, with every file and input glob made absolute: the job
    writes the config to a temporary file on the cluster, where "relative to the config" means nothing."""
    from data_pipeline.config import PipelineConfig, path_bases, resolve_glob, resolve_paths

    data = apply_overrides(read_yaml(path), list(args.overrides))
    config = resolve_paths(validate(PipelineConfig, data, str(path)), path.parent)
    bases = path_bases(path.parent)
    for source in config.sources:
        source.inputs = [_absolute_glob(pattern, bases, resolve_glob) for pattern in source.inputs]
    if args.plan:
        raise ClusterError("--plan applies to training runs, not to data-pipeline jobs")
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), cluster_config(ClusterConfig(), args), []


def _absolute_glob(pattern: str, bases: list[Path], resolve_glob) -> str:
    """The pattern under the first base where it matches (the pipeline's own rule); unmatched
    patterns stay as written, so the run reports them as failed inputs like a local run would."""
    if Path(pattern).is_absolute():
        return pattern
    for base in bases:
        if resolve_glob(str(base / pattern), [base]):
            return os.path.normpath(base / pattern)
    return pattern


def default_name(kind: JobKind, config: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9-]+", "-", config.stem).strip("-").lower() or "job"
    return f"pretrain-{kind}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_job(args: argparse.Namespace) -> Job:
    path = Path(args.config).resolve()
    kind: JobKind = "train" if is_train_yaml(read_yaml(path)) else "data"
    resolved, cluster, overrides = (resolve_train if kind == "train" else resolve_data)(path, args)
    name = args.name or default_name(kind, path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ClusterError(f"--name {name!r}: use letters, digits, '-', '_' and '.'")
    # Defaults: a fresh run dir for training; the data config's own `output` for the pipeline.
    default = Path("runs") / name if kind == "train" else yaml.safe_load(resolved)["output"]
    output = args.output_dir or str(default)
    if cluster.backend != "k8s":  # a pod has its own filesystem: its paths stay as written
        output = str(Path(output).resolve())
    return Job(kind=kind, config_path=path, resolved_yaml=resolved, output_dir=output, name=name,
               cluster=cluster, overrides=overrides)
