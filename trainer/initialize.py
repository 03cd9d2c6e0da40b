"""Layout-invariant initial weights.

Element i of a parameter's flattened whole tensor is mean + std * z, where z comes from a generator
keyed by (seed, the parameter's name, i // CHUNK) and (mean, std) from the model's `init_rule`. Each
rank draws only the chunks its own part touches (a ZeRO-3 partition, its local experts, or the whole
tensor), so the initial model is the same whatever the number of processes, ZeRO stage or ep_size,
and no rank ever draws the whole model.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

CHUNK = 1 << 20


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from its parts (the run's seed first): independent streams that no layout changes."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, name, chunk))


def fill_normal_(target: torch.Tensor, seed: int, name: str, start: int, mean: float, std: float) -> None:
    """target (flat) = mean + std * z for the flat elements [start, start + len(target)) of parameter
    `name`, written a chunk at a time so nothing of the target's size is ever allocated."""
    end = start + target.numel()
    for chunk in range(start // CHUNK, -(-end // CHUNK)):
        z = torch.randn(CHUNK, generator=_generator(seed, name, chunk))
        lo, hi = max(start, chunk * CHUNK), min(end, (chunk + 1) * CHUNK)
        target[lo - start:hi - start].copy_(z[lo - chunk * CHUNK:hi - chunk * CHUNK].mul_(std).add_(mean))


def local_part(p: nn.Parameter) -> tuple[torch.Tensor, int, int]:
    """(this rank's storage of p as a flat tensor, the flat index of its first element in the whole
    tensor, how many of its elements are real: a ZeRO-3 partition is zero-padded past the end)."""
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the rank's flat partition
        part = p.ds_tensor
        start = part.ds_numel * dist.get_rank(group=p.ds_process_group)
        return part, start, max(0, min(part.numel(), p.ds_numel - start))
    return p.data.view(-1), getattr(p, "flat_offset", 0), p.numel()  # flat_offset: trainer.expert_parallel


def secondary_part(p: nn.Parameter) -> tuple[torch.Tensor, int, int] | None:
    """ZeRO++ hpz's second partition of p, over consecutive ranks (a node), or None. zero.Init copied it from
    the weights before they were written, so it is written from the seed like the primary partition."""
    part = getattr(p, "ds_secondary_tensor", None)
    if part is None:
        return None
    padded = p.ds_tensor.ds_numel * dist.get_world_size(group=p.ds_process_group)
    hpz = padded // max(1, part.ds_numel)  # DeepSpeed splits the padded whole into hpz equal parts
    start = part.ds_numel * (dist.get_rank() % hpz)
    return part, start, max(0, min(part.numel(), p.ds_numel - start))


@torch.no_grad()
def initialize(model: nn.Module, seed: int) -> None:
    """Writes every parameter's local part (and hpz's secondary one) from `model.init_rule` and the seed."""
    for name, p in model.named_parameters():
        mean, std = model.init_rule(name)
        for target, start, real in filter(None, (local_part(p), secondary_part(p))):
            if std:
                fill_normal_(target[:real], seed, name, start, mean, std)
            else:
                target[:real].fill_(mean)
            target[real:].zero_()
