"""Switch Transformer top-1 mixture-of-experts FFN (Fedus et al. 2021) with ST-MoE's router z-loss.

Reads top to bottom as the layer runs: the router picks one expert per token (in float32), each
token gets a slot `expert * C + position` of an [E, C] layout (tokens past their expert's capacity
are dropped), the experts (trainer/model/experts.py) compute their kept slots, and each token reads
its slot back scaled by its router probability. Capacity is per routing group (Mesh TensorFlow):
the whole micro-batch by default, or each sequence, or every N tokens. Dispatch is O(tokens x
d_model): there is no [tokens, experts, capacity] one-hot. Written for one device; expert
parallelism wraps `SwitchFFN.experts` from outside (trainer/expert_parallel.py).

Decoding (a KV cache, trainer/sample.py) routes every token to its expert, capacity unbounded. A
capacity makes a token's output depend on the other tokens of its group, even later ones (the group's
size sets it), so a token decoded step by step would route otherwise than in a recomputation of the
whole sequence; without a bound, cached decoding equals recomputing the sequence with a fresh cache.
The remote-code export (trainer/export/modeling_pretrain_switch.py) decodes the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import MoEConfig
from trainer.model.experts import SwitchExperts


@dataclass
class MoEStats:
    """What one MoE layer reports per forward pass, for the loss and for logging."""

    layer: int
    expert_counts: torch.Tensor  # (num_experts,) tokens routed to each expert before dropping
    dropped_frac: torch.Tensor  # fraction of tokens over capacity (they pass through the residual)
    aux_loss: torch.Tensor  # load-balancing loss N * sum_i f_i * P_i, unscaled, differentiable
    z_loss: torch.Tensor  # mean(logsumexp(router logits)^2), unscaled, differentiable


@torch.no_grad()
def draw_(p: torch.Tensor, mean: float, std: float) -> None:
    """p ~ N(mean, std) from torch's RNG, or the constant mean when std is 0."""
    if std:
        p.normal_(mean, std)
    else:
        p.fill_(mean)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(num_tokens / num_experts * capacity_factor)


def rank_within(keys: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count of each key, each element's position among the elements with its key, in order).
    The stable sort keeps token order, which is the priority Switch's cumsum routing gives."""
    counts = torch.bincount(keys, minlength=num_keys)
    order = torch.argsort(keys, stable=True)
    starts = counts.cumsum(0) - counts
    sorted_position = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    return counts, torch.empty_like(keys).scatter_(0, order, sorted_position)


class Routing(NamedTuple):
    logits: torch.Tensor  # (n, E) float32
    probs: torch.Tensor  # (n, E) float32
    gate: torch.Tensor  # (n,) probability of the chosen expert
    expert: torch.Tensor  # (n,) the chosen expert, whether or not it had room
    slot: torch.Tensor  # (n,) slot in the [E, slots_per_expert] layout; E * slots_per_expert when dropped
    group_counts: torch.Tensor  # (groups, E) tokens routed to each expert in each group, before dropping
    capacity: int  # kept tokens per expert and group
    slots_per_expert: int


def assign_slots(expert: torch.Tensor, num_experts: int, capacity: int,
                 groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(slot, group_counts, slots_per_expert): the tokens of each of `groups` equal consecutive groups
    compete for `capacity` places per expert, earlier tokens first; each expert's kept tokens, all
    groups together, then fill its first slots in token order, so kept slots are a prefix of each
    expert's min(groups * capacity, n) slots. Tokens past capacity get the trash slot E * slots_per_expert."""
    n = expert.numel()
    group = torch.arange(n, device=expert.device) // (n // groups)
    group_counts, in_group = rank_within(group * num_experts + expert, groups * num_experts)
    kept = in_group < capacity
    position = in_group if groups == 1 else rank_within(torch.where(kept, expert, num_experts), num_experts + 1)[1]
    per_expert = min(groups * capacity, n)
    slot = torch.where(kept, expert * per_expert + position, num_experts * per_expert)
    return slot, group_counts.view(groups, num_experts), per_expert


class SwitchFFN(nn.Module):
    """Top-1 routed FFN. forward(x[..., d]) -> (y[..., d], MoEStats); dropped tokens get y = 0."""

    def __init__(self, d_model: int, d_ff: int, moe_cfg: MoEConfig, *, layer: int = 0, bias: bool = True,
                 activation: str = "gelu", init_std: float = 0.02, out_init_std: Optional[float] = None):
        super().__init__()
        self.cfg = moe_cfg
        self.layer = layer
        self.init_std = init_std
        self.out_init_std = out_init_std if out_init_std is not None else init_std
        self.router = nn.Linear(d_model, moe_cfg.num_experts, bias=moe_cfg.router_bias)
        self.experts = SwitchExperts(moe_cfg.num_experts, d_model, d_ff, bias, activation)
        self.reset_parameters()

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def init_rule(self, name: str) -> tuple[float, float]:
        """(mean, std) of this layer's parameter `name`: Switch scales the experts' init by expert_init_scale."""
        if name.rsplit(".", 1)[-1] in ("b_fc", "b_proj", "bias"):
            return 0.0, 0.0
        std = self.out_init_std if name.endswith("w_proj") else self.init_std
        return 0.0, std * (self.cfg.expert_init_scale if name.startswith("experts.") else 1.0)

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            draw_(p, *self.init_rule(name))

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, E) logits in float32 whatever the input dtype or autocast: routing is precision-sensitive."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            h = tokens.float()
            if self.training and self.cfg.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
            bias = None if self.router.bias is None else self.router.bias.float()
            return F.linear(h, self.router.weight.float(), bias)

    def group_size(self, x: torch.Tensor) -> int:
        """Tokens per routing group of input x[..., T, d]."""
        n, group = x.numel() // x.shape[-1], self.cfg.routing_group
        size = {"batch": n, "sequence": x.shape[-2] if x.dim() > 2 else n}.get(group, group)
        if n % size:
            raise ValueError(f"model.moe.routing_group: groups of {size} tokens do not divide the {n} tokens "
                             f"of this batch")
        return size

    def route(self, x: torch.Tensor, decoding: bool = False) -> Routing:
        """Router (float32) and slot assignment for input x[..., d]; capacity from the routing group's size,
        or, decoding, one group with room for every token."""
        tokens = x.reshape(-1, x.shape[-1])
        num_experts = self.cfg.num_experts
        logits = self.router_logits(tokens)
        probs = logits.softmax(dim=-1)
        gate, expert = probs.max(dim=-1)
        if decoding:
            group_size = capacity = tokens.shape[0]
        else:
            group_size = self.group_size(x)
            factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
            capacity = self.cfg.expert_capacity or expert_capacity(group_size, num_experts, factor)
        slot, group_counts, per_expert = assign_slots(expert, num_experts, capacity, tokens.shape[0] // group_size)
        return Routing(logits, probs, gate, expert, slot, group_counts, capacity, per_expert)

    def forward(self, x: torch.Tensor, decoding: bool = False) -> tuple[torch.Tensor, MoEStats]:
        """decoding: no token is dropped (module docstring)."""
        d = x.shape[-1]
        tokens = x.reshape(-1, d)
        n, num_experts = tokens.shape[0], self.cfg.num_experts
        r = self.route(x, decoding)
        # Slots: slot s of the [E, C] layout holds token token_of_slot[s]. Padding slots point at
        # token 0, a finite stand-in that the experts skip or whose output is never read.
        slots = num_experts * r.slots_per_expert
        token_of_slot = torch.zeros(slots + 1, dtype=torch.long, device=x.device)
        token_of_slot[r.slot] = torch.arange(n, device=x.device)  # dropped tokens all land in the extra entry
        kept_rows = r.group_counts.clamp(max=r.capacity).sum(0)  # the first kept_rows[e] slots of expert e
        # Experts.
        out = self.experts(tokens, token_of_slot[:slots], [kept_rows.tolist()]).view(slots, d)
        # Combine: a dropped token's gate is zeroed (it reads an arbitrary slot), so it leaves the
        # layer as 0 and the residual carries it.
        kept = r.slot < slots
        gate = torch.where(kept, r.gate, 0.0).to(out.dtype)
        y = out.index_select(0, r.slot.clamp(max=slots - 1)) * gate.unsqueeze(1)
        return y.view(x.shape), self.stats(r, kept)

    def stats(self, r: Routing, kept: torch.Tensor) -> MoEStats:
        """Losses per routing group, averaged over groups (Mesh TensorFlow); one group is the paper's batch."""
        groups, num_experts = r.group_counts.shape
        routed_frac = r.group_counts.float() / (r.expert.numel() // groups)
        mean_probs = r.probs.view(groups, -1, num_experts).mean(dim=1)
        return MoEStats(
            layer=self.layer,
            expert_counts=r.group_counts.sum(0).detach(),
            dropped_frac=(~kept).float().mean().detach(),
            aux_loss=num_experts * torch.sum(routed_frac * mean_probs, dim=-1).mean(),
            z_loss=torch.logsumexp(r.logits, dim=-1).square().mean(),
        )
