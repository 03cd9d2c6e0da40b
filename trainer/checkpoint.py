"""Checkpoints: RUN/checkpoints/step-N/ holds DeepSpeed's files (ZeRO shards, optimizer state),
each rank's trainer state (data position, RNG states, counters), the full fp32 weights of every
expert shard (`model-ep{e}.pt`, which is what consolidation and export read), the resolved config,
and finally a COMPLETE marker. `latest` is replaced atomically only after COMPLETE exists, so a
crash while saving leaves the previous checkpoint as the newest valid one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import groups
from deepspeed.utils.tensor_fragment import safe_get_full_fp32_param

from trainer import testing_hooks
from trainer.errors import TrainError

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _expert_shard_writer(engine) -> tuple[bool, int]:
    """(this rank writes a weights file, its expert-parallel rank). One rank per expert shard."""
    if not engine.has_moe_layers:
        return dist.get_rank() == 0, 0
    name = groups._get_max_expert_size_name()
    return groups._get_expert_data_parallel_rank(name) == 0, groups._get_expert_parallel_rank(name)


def full_fp32_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter in fp32, whole (ZeRO shards gathered; collective: all ranks must call it).
    Tied parameters appear under each of their names, like `state_dict()`."""
    out, by_param = {}, {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        if id(p) not in by_param:  # tied weights: one tensor under both names, stored once by torch.save
            full = safe_get_full_fp32_param(p)
            if full is None:  # no ZeRO partitioning and no low-precision copy: the parameter is the master
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach()
            by_param[id(p)] = full.detach().float().cpu().clone()
        out[name] = by_param[id(p)]
    persistent = engine.module.state_dict().keys()  # not a table the model rebuilds from its config
    for name, b in engine.module.named_buffers():
        if name in persistent:
            out[name] = b.detach().cpu().clone()
    return out


def save(engine, root: Path, step: int, trainer_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Collective. Returns the step dir."""
    tag = f"step-{step}"
    path = root / tag
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a leftover half-written save of the same step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    weights = full_fp32_state(engine)
    writes, ep_rank = _expert_shard_writer(engine)
    if writes:
        torch.save(weights, path / f"model-ep{ep_rank}.pt")
    atomic_write(path / f"trainer-rank{rank}.json", json.dumps(trainer_state))
    if rank == 0:
        atomic_write(path / "config.yaml", config_yaml)
    dist.barrier()
    testing_hooks.before_commit()
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size(), "time": time.time()}
        atomic_write(path / COMPLETE, json.dumps(meta))
        atomic_write(root / "latest", tag)
        prune(root, keep_last)
    dist.barrier()
    return path


def prune(root: Path, keep_last: int) -> None:
    complete = [p for _, p in step_dirs(root) if is_complete(p)]
    for path in complete[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def load(engine, path: Path) -> dict:
    """Restores engine (weights, optimizer, ZeRO shards) and returns this rank's trainer state."""
    rank = dist.get_rank()
    state_file = path / f"trainer-rank{rank}.json"
    meta = json.loads((path / COMPLETE).read_text())
    if meta["world_size"] != dist.get_world_size() or not state_file.is_file():
        raise TrainError(f"{path} was written by {meta['world_size']} processes, this run has "
                         f"{dist.get_world_size()}: resume with the same --nproc")
    check_resumable(engine, path)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise TrainError(f"{path}: DeepSpeed could not load this checkpoint")
    if engine.has_moe_layers:
        restore_local_experts(engine, path)
    return json.loads(state_file.read_text())


def _old_w_proj(name: str, saved: torch.Size, expected: torch.Size) -> bool:
    """A Switch w_proj written before 2026-11-27, stored [experts, d_ff, d_model] (now [experts, d_model, d_ff])."""
    return (name.endswith(".w_proj") and len(saved) == 3 and saved != expected
            and tuple(saved) == (expected[0], expected[2], expected[1]))


def shape_problems(expected: dict[str, torch.Size], saved: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `saved` from loading into a model with these parameter shapes, one line per key."""
    problems = [f"{name} missing from the checkpoint" for name in expected if name not in saved]
    problems += [f"{name} is not in this model" for name in saved if name not in expected]
    for name, shape in expected.items():
        if name in saved and tuple(saved[name].shape) != tuple(shape):
            old = " (Switch w_proj in the layout before 2026-11-27)" if _old_w_proj(name, saved[name].shape, shape) else ""
            problems.append(f"{name} has shape {list(saved[name].shape)}{old}, this model {list(shape)}")
    return problems


def _first_few(problems: list[str]) -> str:
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def check_resumable(engine, path: Path) -> None:
    """Refuses, with the mismatched keys named, a checkpoint whose weights do not fit this run's model
    (a changed model config, or a checkpoint from an older layout), before DeepSpeed tries to load it."""
    _, ep_rank = _expert_shard_writer(engine)
    weights = path / f"model-ep{ep_rank}.pt"
    if not weights.is_file():
        raise TrainError(f"{path}: {weights.name} is missing, so this checkpoint cannot be resumed")
    buffers = {name for name, _ in engine.module.named_buffers()}  # follow from the config, checked already
    saved = {name: t for name, t in torch.load(weights, map_location="cpu", weights_only=True, mmap=True).items()
             if name not in buffers}
    expected = {name: getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions p; ds_shape is its whole shape
                for name, p in engine.module.named_parameters(remove_duplicate=False)}
    problems = shape_problems(expected, saved)
    if not problems:
        return
    hint = ("`pretrain eval` and `pretrain export` still read it (they convert the old layout), but its "
            "optimizer state cannot be converted: start a new --run-dir"
            if any("before 2026-11-27" in line for line in problems) else
            "resume with the model config this run was started with, or start a new --run-dir")
    raise TrainError(f"{path} does not fit this run's model: {_first_few(problems)}. {hint}")


def fit_to_model(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """`state` (from consolidate) ready for model.load_state_dict: Switch w_proj weights saved in the
    layout before 2026-11-27 are transposed; any other mismatch is refused with the keys named."""
    expected = dict(model.state_dict())
    rebuilt = {name for name, _ in model.named_buffers()} - expected.keys()  # non-persistent (e.g. sinusoidal table)
    state = {name: t.transpose(1, 2).contiguous() if name in expected and _old_w_proj(name, t.shape, expected[name].shape)
             else t for name, t in state.items() if name not in rebuilt}
    problems = shape_problems({name: t.shape for name, t in expected.items()}, state)
    if problems:
        raise TrainError(f"{source}: the weights do not fit the model its config.yaml describes: "
                         f"{_first_few(problems)}")
    return state


@torch.no_grad()
def restore_local_experts(engine, path: Path) -> None:
    """DeepSpeed loads the module from rank 0's model file, so every rank would get rank 0's experts
    (its optimizer shards hold the right ones, but only reach the module after the next step).
    Put this rank's own experts back from its expert shard file."""
    _, ep_rank = _expert_shard_writer(engine)
    saved = torch.load(path / f"model-ep{ep_rank}.pt", map_location="cpu", weights_only=True)
    for name, p in engine.module.named_parameters():
        if getattr(p, "allreduce", True) is False:
            p.copy_(saved[name].to(p.dtype))


def discard_incomplete(root: Path) -> None:
    """Rank 0, after every rank chose what to resume from: delete half-written newer saves."""
    for _, path in step_dirs(root):
        if is_complete(path):
            return
        shutil.rmtree(path, ignore_errors=True)


def consolidate(path: str | Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict with every expert, for a GPT built without expert parallelism.
    Expert tensors are stacked [local experts, ...] per shard, so shards concatenate along dim 0."""
    step_dir = resolve(path)
    shards = sorted(step_dir.glob("model-ep*.pt"), key=lambda p: int(p.stem.removeprefix("model-ep")))
    if not shards:
        raise TrainError(f"{step_dir}: no model-ep*.pt weights in this checkpoint")
    parts = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]
    merged = {}
    for key, value in parts[0].items():
        merged[key] = torch.cat([part[key] for part in parts]) if _expert_key(key) else value
    return merged


def _expert_key(key: str) -> bool:
    """Our Switch layer's stacked expert tensors (trainer/model/moe.py: w_fc, b_fc, w_proj, b_proj)."""
    return key.rsplit(".", 1)[-1] in ("w_fc", "b_fc", "w_proj", "b_proj")
