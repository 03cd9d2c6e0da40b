"""The fp32 weights of a checkpoint, written by each rank for the part it owns, and read back whole.

Each rank writes `weights-rank{r}.safetensors`: for every parameter, the fragment of its fp32 master
that this rank holds (a ZeRO-1/2 slice of the flat optimizer partition, a ZeRO-3 partition, or, with
unpartitioned masters, the whole tensor on the one rank that owns it), with the fragment's place in
the whole flattened tensor in the metadata. Expert parameters count their place across every
expert-parallel rank. No rank gathers anything to save. Reading puts the fragments of all ranks
back together one parameter at a time, so a whole checkpoint is never in memory at once.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param
from safetensors import safe_open

from trainer.distributed import expert_data_parallel_rank
from trainer.errors import TrainError
from trainer.expert_parallel import is_expert
from trainer.tensorfile import SafetensorsWriter

FILE_RE = re.compile(r"^weights-rank(\d+)\.safetensors$")


def file_name(rank: int) -> str:
    return f"weights-rank{rank}.safetensors"


def whole_shape(p: torch.nn.Parameter, ep_size: int) -> tuple[int, ...]:
    shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the whole shape beside the partition
    return (shape[0] * ep_size, *shape[1:]) if is_expert(p) else shape


def owned_fragments(engine, ep_size: int) -> Iterator[tuple[str, int, torch.Tensor, tuple[int, ...]]]:
    """(name, flat start in the whole tensor, fp32 1-D fragment, whole shape) of what this rank owns."""
    partitioned = engine.zero_optimization_stage() >= 1 or engine.bfloat16_enabled()
    for name, p in engine.module.named_parameters():
        offset, shape = getattr(p, "flat_offset", 0), whole_shape(p, ep_size)
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flat parameter, padded at the end
            part = safe_get_local_fp32_param(p)
            start = p.ds_tensor.ds_numel * dist.get_rank(group=p.ds_process_group)
            real = max(0, min(part.numel(), p.ds_numel - start))
            if real:
                yield name, offset + start, part[:real], shape
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2 (and bf16): a slice of the fp32 partition
            yield name, offset + p._hp_mapping.lp_fragment_address.start, p._hp_mapping.get_hp_fragment(), shape
        elif not partitioned and _owner(p):  # replicated masters: one rank writes them
            yield name, offset, p.detach().view(-1), shape


def _owner(p: torch.nn.Parameter) -> bool:
    return expert_data_parallel_rank(p.group_name) == 0 if is_expert(p) else dist.get_rank() == 0


def save(engine, step_dir: Path, ep_size: int) -> Path:
    """Writes this rank's file (collective-free)."""
    fragments = list(owned_fragments(engine, ep_size))
    meta = {name: {"start": start, "shape": list(shape)} for name, start, _, shape in fragments}
    path = step_dir / file_name(dist.get_rank())
    with SafetensorsWriter(path, [(name, (t.numel(),), torch.float32) for name, _, t, _ in fragments],
                           {"fragments": json.dumps(meta)}) as writer:
        for name, _, t, _ in fragments:
            writer.write(name, t.detach().float())  # a 16-bit replica is converted one tensor at a time
    return path


class ShardedWeights:
    """All ranks' weight files of one checkpoint, opened lazily (memory-mapped)."""

    def __init__(self, step_dir: Path):
        found = sorted((int(m.group(1)), p) for p in step_dir.iterdir() if (m := FILE_RE.match(p.name)))
        if not found:
            raise TrainError(f"{step_dir}: no weights-rank*.safetensors in this checkpoint (written by an older "
                             "version of pretrain, or not a checkpoint)")
        self.step_dir = step_dir
        self.files = [safe_open(str(p), "pt") for _, p in found]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pieces: dict[str, list[tuple[int, int, int]]] = {}  # name -> (start, numel, file index)
        for i, f in enumerate(self.files):
            for name, rec in json.loads(f.metadata()["fragments"]).items():
                self.shapes.setdefault(name, tuple(rec["shape"]))
                self.pieces.setdefault(name, []).append((rec["start"], f.get_slice(name).get_shape()[0], i))

    def read(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Flat fp32 elements [start, end) of `name`; refuses a range the fragments do not cover exactly."""
        end = math.prod(self.shapes[name]) if end is None else end
        out, covered = torch.empty(end - start), 0
        for piece_start, numel, i in self.pieces[name]:
            lo, hi = max(start, piece_start), min(end, piece_start + numel)
            if lo < hi:
                out[lo - start:hi - start] = self.files[i].get_slice(name)[lo - piece_start:hi - piece_start]
                covered += hi - lo
        if covered != end - start:
            raise TrainError(f"{self.step_dir}: the weight files hold {covered} of the {end - start} elements "
                             f"[{start}, {end}) of {name} (a weights-rank file is missing or from another save)")
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes.items():
            yield name, self.read(name).view(shape)


def consolidate(step_dir: Path, out: Path) -> Path:
    """One fp32 safetensors file of the whole model, written a parameter at a time."""
    weights = ShardedWeights(step_dir)
    specs = [(name, shape, torch.float32) for name, shape in weights.shapes.items()]
    with SafetensorsWriter(out, specs, {"source": str(step_dir)}) as writer:
        for name, tensor in weights.tensors():
            writer.write(name, tensor)
    return out
