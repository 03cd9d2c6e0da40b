"""Expert parallelism, applied to an unchanged model from outside (as torchtitan's ExpertParallel).

Each rank of an expert-parallel group of size ep keeps E/ep of every Switch layer's experts. Hooks
on the experts module dispatch tokens before it runs (the [E, C, d] slot buffer and the kept-token
counts go through an all-to-all, so each rank computes [ep, E/ep, C, d] for its own experts) and
combine after (the results go back the same way). Capacity comes from each rank's own tokens, so
every rank of a group must pass the same number of tokens (fixed micro batch and sequence length).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.distributed import expert_group_name
from trainer.model.experts import SwitchExperts


class _AllToAll(torch.autograd.Function):
    """Chunk r of dim 0 goes to rank r; the gradient goes back the same way. By hand because
    torch.distributed.nn's is deprecated and the functional collective aborted gloo processes at exit."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


def _all_to_all(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _AllToAll.apply(t, group)


def _keep_local(experts: SwitchExperts, rank: int, size: int) -> None:
    local = experts.num_experts // size
    for name, p in list(experts.named_parameters(recurse=False)):
        shard = nn.Parameter(p.detach()[rank * local:(rank + 1) * local].clone())  # free on the meta device
        shard.flat_offset = rank * shard.numel()  # where it starts in the whole tensor (trainer.initialize)
        setattr(experts, name, shard)


def _dispatch(group: dist.ProcessGroup, size: int):
    def hook(experts: SwitchExperts, args):
        tokens, token_of_slot, rows = args
        received = _all_to_all(tokens.index_select(0, token_of_slot), group)
        with torch.no_grad():  # rows[r][j]: how many tokens rank r sent to local expert j
            counts = _all_to_all(torch.tensor(rows[0], device=tokens.device), group)
        index = torch.arange(received.shape[0], device=received.device)
        return received, index, counts.view(size, -1).tolist()
    return hook


def _combine(group: dist.ProcessGroup):
    def hook(experts: SwitchExperts, args, out: torch.Tensor) -> torch.Tensor:
        return _all_to_all(out, group)  # [ep, E/ep, C, d] back to the senders: [E, C, d] in expert order
    return hook


def apply_expert_parallel(model: nn.Module, ep_size: int, group: Optional[dist.ProcessGroup] = None) -> None:
    """Shards every Switch layer's experts over `group` (ep_size ranks, dividing the expert count as
    RunConfig checks; None when ep_size is 1) and
    marks expert parameters the way DeepSpeed MoE does (`allreduce=False`, `group_name`), so the
    engine reduces their gradients over the ranks that hold the same experts only."""
    rank = dist.get_rank(group) if ep_size > 1 else 0
    for module in model.modules():
        if not isinstance(module, SwitchExperts):
            continue
        if ep_size > 1:
            _keep_local(module, rank, ep_size)
            module.register_forward_pre_hook(_dispatch(group, ep_size))
            module.register_forward_hook(_combine(group))
        for p in module.parameters():
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)


def is_expert(p: nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False
