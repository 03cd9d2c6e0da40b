"""Switch Transformer top-1 mixture-of-experts FFN (Fedus et al. 2021) with ST-MoE's router z-loss.

Reads top to bottom as the layer runs: the router picks one expert per token (in float32), each
token gets a slot `expert * capacity + position` of an [E, C] layout (tokens past capacity are
dropped), the experts (trainer/model/experts.py) compute their kept slots, and each token reads
its slot back scaled by its router probability. Dispatch is O(tokens x d_model): there is no
[tokens, experts, capacity] one-hot. Written for one device; expert parallelism wraps
`SwitchFFN.experts` from outside (trainer/expert_parallel.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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


def assign_slots(expert: torch.Tensor, num_experts: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot `expert * capacity + position` for each token, earlier tokens first within an expert.

    Tokens past their expert's capacity get the trash slot `num_experts * capacity`.
    Returns (slot, counts); counts are per expert before dropping. The stable sort keeps
    token order within an expert, which is the priority Switch's cumsum routing gives.
    """
    n = expert.numel()
    counts = torch.bincount(expert, minlength=num_experts)
    order = torch.argsort(expert, stable=True)
    starts = counts.cumsum(0) - counts
    sorted_position = torch.arange(n, device=expert.device) - starts[expert[order]]
    position = torch.empty_like(expert).scatter_(0, order, sorted_position)
    trash = torch.full_like(expert, num_experts * capacity)
    return torch.where(position < capacity, expert * capacity + position, trash), counts


class SwitchFFN(nn.Module):
    """Top-1 routed FFN. forward(x[..., d]) -> (y[..., d], MoEStats); dropped tokens get y = 0."""

    def __init__(self, d_model: int, d_ff: int, moe_cfg: MoEConfig, *, layer: int = 0, bias: bool = True,
                 init_std: float = 0.02, out_init_std: Optional[float] = None):
        super().__init__()
        self.cfg = moe_cfg
        self.layer = layer
        self.init_std = init_std
        self.out_init_std = out_init_std if out_init_std is not None else init_std
        self.router = nn.Linear(d_model, moe_cfg.num_experts, bias=False)
        self.experts = SwitchExperts(moe_cfg.num_experts, d_model, d_ff, bias)
        self.reset_parameters()

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def init_rule(self, name: str) -> tuple[float, float]:
        """(mean, std) of this layer's parameter `name`: Switch scales the experts' init by expert_init_scale."""
        if name.rsplit(".", 1)[-1] in ("b_fc", "b_proj"):
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
            return F.linear(h, self.router.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        d = x.shape[-1]
        tokens = x.reshape(-1, d)
        n, num_experts = tokens.shape[0], self.cfg.num_experts
        # Router.
        logits = self.router_logits(tokens)
        probs = logits.softmax(dim=-1)
        gate, expert = probs.max(dim=-1)
        # Slots: slot s of the [E, C] layout holds token token_of_slot[s]. Padding slots point at
        # token 0, a finite stand-in that the experts skip or whose output is never read.
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        capacity = expert_capacity(n, num_experts, factor)
        slot, counts = assign_slots(expert, num_experts, capacity)
        slots = num_experts * capacity
        token_of_slot = torch.zeros(slots + 1, dtype=torch.long, device=x.device)
        token_of_slot[slot] = torch.arange(n, device=x.device)  # dropped tokens all land in the extra entry
        kept_rows = counts.clamp(max=capacity)  # the first kept_rows[e] slots of expert e hold its tokens
        # Experts.
        out = self.experts(tokens, token_of_slot[:slots], [kept_rows.tolist()]).view(slots, d)
        # Combine: a dropped token's gate is zeroed (it reads an arbitrary slot), so it leaves the
        # layer as 0 and the residual carries it.
        kept = slot < slots
        gate = torch.where(kept, gate, 0.0).to(out.dtype)
        y = out.index_select(0, slot.clamp(max=slots - 1)) * gate.unsqueeze(1)

        routed_frac = counts.float() / n
        stats = MoEStats(
            layer=self.layer,
            expert_counts=counts.detach(),
            dropped_frac=(~kept).float().mean().detach(),
            aux_loss=num_experts * torch.sum(routed_frac * probs.mean(dim=0)),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
        )
        return y.view(x.shape), stats
