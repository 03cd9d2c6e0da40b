"""Checkpoints: RUN/checkpoints/step-N/ holds DeepSpeed's files (each rank's ZeRO partitions and
optimizer state), each rank's fp32 weight fragments (`weights-rank{r}.safetensors`, what
consolidation, eval and export read; trainer/weight_shards.py), each rank's trainer state (data
position, RNG states, counters), the resolved config, and finally a COMPLETE marker with the layout
that wrote it. Every rank writes only what it owns. `latest` is replaced atomically only after
COMPLETE exists, so a crash while saving leaves the previous checkpoint as the newest valid one.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from shard_format import atomic_write
from trainer import testing_hooks, weight_shards
from trainer.errors import TrainError
from trainer.expert_parallel import is_expert

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """All step-N dirs, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def newest_valid(root: Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint; newer half-written ones are skipped with a warning."""
    for _, path in step_dirs(root):
        if is_complete(path):
            return path
        if warn:
            log.warning("skipping checkpoint %s: it was not completely written (no %s marker)", path, COMPLETE)
    return None


def resolve(path: str | Path) -> Path:
    """A run dir, a checkpoints dir or a step dir -> the step dir to read."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = newest_valid(root, warn=False)
        if found:
            return found
    raise TrainError(f"{path}: no complete checkpoint found (looked for step-N/{COMPLETE})")


def save(engine, root: Path, step: int, trainer_state: dict, config_yaml: str, keep_last: int, layout: dict) -> Path:
    """Collective. `layout`: world_size, zero_stage, ep_size, recorded in COMPLETE. Returns the step dir."""
    tag = f"step-{step}"
    path = root / tag
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a leftover half-written save of the same step
    check_free_space(root, tag, required_bytes(engine, root, layout["ep_size"]), engine.device)
    failure = None
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        weight_shards.save(engine, path, layout["ep_size"])
        atomic_write(path / f"trainer-rank{rank}.json", json.dumps(trainer_state))
        if rank == 0:
            atomic_write(path / "config.yaml", config_yaml)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e, root):
            raise
        failure = e
    if _any_rank(failure is not None, engine.device):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # frees what the half-written save took
        dist.barrier()
        kept = newest_valid(root, warn=False)
        raise TrainError(f"the disk under {root} filled up while saving {tag} ({_gb(_free(root))} free now); the "
                         f"partial {tag} was removed and "
                         + (f"{kept.name} is still the newest checkpoint" if kept else "no earlier checkpoint exists")
                         + ". Free space, or lower checkpoint.keep_last, or point --run-dir at a larger disk")
    dist.barrier()
    testing_hooks.before_commit()
    if rank == 0:
        meta = {"step": step, **layout, "time": time.time()}
        atomic_write(path / COMPLETE, json.dumps(meta))
        atomic_write(root / "latest", tag)
        prune(root, keep_last)
    dist.barrier()
    return path


def required_bytes(engine, root: Path, ep_size: int) -> int:
    """Disk a new checkpoint needs: the newest complete one's size (same layout, same files), or, before the
    first, a lower bound (the fp32 weights written here plus DeepSpeed's fp32 optimizer partitions), so a
    refusal is never wrong."""
    newest = newest_valid(root, warn=False)
    if newest is not None:
        return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    whole = sum(math.prod(weight_shards.whole_shape(p, ep_size)) for p in engine.module.parameters())
    return whole * 4 * 2


def check_free_space(root: Path, tag: str, need: int, device="cpu") -> None:
    """Collective: refuses on every rank, before anything is written, a save the disk cannot hold."""
    root.mkdir(parents=True, exist_ok=True)
    free = _free(root)
    if _any_rank(free < need, device):
        raise TrainError(f"not enough disk space under {root} to save {tag}: it needs about {_gb(need)}, "
                         f"{_gb(free)} is free. Free space, or lower checkpoint.keep_last, or point --run-dir at a "
                         "larger disk")


def _disk_full(e: Exception, root: Path) -> bool:
    """An OSError says ENOSPC; torch.save's writer reports it as a RuntimeError ("file write failed")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left" in str(e) or ("write failed" in str(e) and _free(root) < 64 * 2 ** 20)


def _free(root: Path) -> int:
    return shutil.disk_usage(root).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([int(flag)], device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return bool(t.item())


def prune(root: Path, keep_last: int) -> None:
    complete = [p for _, p in step_dirs(root) if is_complete(p)]
    for path in complete[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def describe(layout: dict) -> str:
    return (f"{layout.get('world_size')} processes at ZeRO-{layout.get('zero_stage', '?')}, "
            f"ep_size {layout.get('ep_size', '?')}")


def load(engine, path: Path, layout: dict) -> dict:
    """Restores engine (weights, optimizer, ZeRO shards) and returns this rank's trainer state.
    The optimizer state is partitioned by layout, so a checkpoint resumes only in the layout that wrote it."""
    meta = json.loads((path / COMPLETE).read_text())
    saved = {key: meta.get(key) for key in layout}
    if saved != layout:
        raise TrainError(f"{path} was written by {describe(saved)}; this run has {describe(layout)}. Resume with "
                         "the same --nproc and parallel settings (DeepSpeed's optimizer partitions follow the layout)")
    weights = weight_shards.ShardedWeights(path)
    check_resumable(engine, path, weights, layout["ep_size"])
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise TrainError(f"{path}: DeepSpeed could not load this checkpoint")
    if engine.has_moe_layers:
        restore_local_experts(engine, weights)
    return json.loads((path / f"trainer-rank{dist.get_rank()}.json").read_text())


def shape_problems(expected: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps weights of shapes `saved` from loading into a model with shapes `expected`, one line per key."""
    problems = [f"{name} missing from the checkpoint" for name in expected if name not in saved]
    problems += [f"{name} is not in this model" for name in saved if name not in expected]
    for name, shape in expected.items():
        if name in saved and tuple(saved[name]) != tuple(shape):
            problems.append(f"{name} has shape {list(saved[name])}, this model {list(shape)}")
    return problems


def _first_few(problems: list[str]) -> str:
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def check_resumable(engine, path: Path, weights: weight_shards.ShardedWeights, ep_size: int) -> None:
    """Refuses, with the mismatched keys named, a checkpoint whose weights do not fit this run's model
    (a changed model config), before DeepSpeed tries to load it."""
    expected = {name: weight_shards.whole_shape(p, ep_size) for name, p in engine.module.named_parameters()}
    problems = shape_problems(expected, weights.shapes)
    if problems:
        raise TrainError(f"{path} does not fit this run's model: {_first_few(problems)}. Resume with the model "
                         "config this run was started with, or start a new --run-dir")


def load_into(model: torch.nn.Module, path: Path) -> None:
    """The consolidated weights of checkpoint `path` into a model built whole on one device; a mismatch
    is refused with the keys named. Tied parameters are stored once, under their first name."""
    weights = weight_shards.ShardedWeights(path)
    params = dict(model.named_parameters())
    problems = shape_problems({name: tuple(p.shape) for name, p in params.items()}, weights.shapes)
    if problems:
        raise TrainError(f"{path}: the weights do not fit the model its config.yaml describes: "
                         f"{_first_few(problems)}")
    with torch.no_grad():
        for name, tensor in weights.tensors():
            params[name].copy_(tensor)


@torch.no_grad()
def restore_local_experts(engine, weights: weight_shards.ShardedWeights) -> None:
    """DeepSpeed loads the module from rank 0's model file, so every rank would get rank 0's experts
    (its optimizer partitions hold the right ones, but reach the module only after the next step).
    Put this rank's own experts back from the weight files."""
    for name, p in engine.module.named_parameters():
        if is_expert(p):
            start = getattr(p, "flat_offset", 0)
            p.copy_(weights.read(name, start, start + p.numel()).view_as(p))


def discard_incomplete(root: Path) -> None:
    """Rank 0, after every rank chose what to resume from: delete half-written newer saves."""
    for _, path in step_dirs(root):
        if is_complete(path):
            return
        shutil.rmtree(path, ignore_errors=True)
