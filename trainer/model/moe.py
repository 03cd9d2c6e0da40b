"""Switch Transformer top-1 mixture-of-experts FFN (Fedus et al. 2021) with ST-MoE's router z-loss.

Dispatch costs O(tokens x d_model): tokens are sorted by expert, each gets a slot
`expert * capacity + position` in an [E, C, d] buffer, the experts run as batched matmuls
over that buffer, and each token gathers its result back. There is no
[tokens, experts, capacity] one-hot.

Expert parallelism is one code path with the single-device case: with an `ep_group` of
size ep, this rank holds E/ep experts, and the [E, C, d] buffer is exchanged with a
differentiable all-to-all so each rank computes [E/ep, ep*C, d] for its own experts. Without
a group the exchange is skipped. Capacity is computed from this rank's tokens, so every rank
in the group must pass the same number of tokens (fixed micro batch and sequence length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed.nn.functional import all_to_all_single

from trainer.config import MoEConfig


@dataclass
class MoEStats:
    """What one MoE layer reports per forward pass, for the loss and for logging."""

    layer: int
    expert_counts: torch.Tensor  # (num_experts,) tokens routed to each expert before dropping
    dropped_frac: torch.Tensor  # fraction of tokens over capacity (they pass through the residual)
    aux_loss: torch.Tensor  # load-balancing loss N * sum_i f_i * P_i, unscaled, differentiable
    z_loss: torch.Tensor  # mean(logsumexp(router logits)^2), unscaled, differentiable


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


def _rows(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[rows]


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.bmm(x, weight, out=out) if bias is None else torch.baddbmm(bias, x, weight, out=out)


class ExpertMLP(torch.autograd.Function):
    """gelu(x @ w_fc + b_fc) @ w_proj + b_proj for every expert at once: x is [E, C, d].

    A Function for memory's sake. Plain autograd keeps two [E, C, d_ff] activations and builds
    [E, C, d_ff] gradients in one piece. Here both passes walk the experts in chunks: the forward
    keeps only each chunk's pre-activation (GELU is recomputed from it), and the backward frees a
    chunk's pre-activation as soon as it has written that chunk's gradients, so activation memory
    drains while the weight gradients fill up. The backward can therefore run only once (no
    retain_graph). Tensors arrive in the compute dtype (SwitchFFN.in_compute_dtype).
    """

    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj):
        ctx.save_for_backward(x, w_fc, b_fc, w_proj, b_proj)
        out = x.new_empty(x.shape[0], x.shape[1], w_proj.shape[2])
        ctx.pre_activations = []  # intermediates, not inputs or outputs: kept on ctx so backward can free them
        with torch.autocast(x.device.type, enabled=False):
            for rows in ExpertMLP.chunks(w_fc):
                pre = _affine(x[rows], w_fc[rows], _rows(b_fc, rows))
                _affine(F.gelu(pre, approximate="tanh"), w_proj[rows], _rows(b_proj, rows), out=out[rows])
                ctx.pre_activations.append(pre)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.pre_activations is None:
            raise RuntimeError("ExpertMLP frees its activations in backward: retain_graph is not supported")
        x, w_fc, b_fc, w_proj, b_proj = ctx.saved_tensors
        pre_activations, ctx.pre_activations = ctx.pre_activations, None
        grad_out = grad_out.contiguous()
        grad_x, grad_w_fc, grad_w_proj = torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)
        grad_b_fc = None if b_fc is None else torch.empty_like(b_fc)
        grad_b_proj = None if b_proj is None else grad_out.sum(dim=1, keepdim=True)
        with torch.autocast(x.device.type, enabled=False):
            for i, rows in enumerate(ExpertMLP.chunks(w_fc)):
                pre, pre_activations[i] = pre_activations[i], None
                g = grad_out[rows]
                torch.bmm(F.gelu(pre, approximate="tanh").transpose(1, 2), g, out=grad_w_proj[rows])
                grad_pre = torch.ops.aten.gelu_backward(torch.bmm(g, w_proj[rows].transpose(1, 2)), pre,
                                                        approximate="tanh")
                del pre
                torch.bmm(x[rows].transpose(1, 2), grad_pre, out=grad_w_fc[rows])
                torch.bmm(grad_pre, w_fc[rows].transpose(1, 2), out=grad_x[rows])
                if grad_b_fc is not None:
                    torch.sum(grad_pre, dim=1, keepdim=True, out=grad_b_fc[rows])
        return grad_x, grad_w_fc, grad_b_fc, grad_w_proj, grad_b_proj

    @staticmethod
    def chunks(w_fc: torch.Tensor) -> list[slice]:
        """Expert ranges whose [k, C, d_ff] hidden activation is about a quarter of x's [E, C, d]."""
        num_experts, d_model, d_ff = w_fc.shape
        step = max(1, num_experts * d_model // (4 * d_ff))
        return [slice(i, i + step) for i in range(0, num_experts, step)]


class SwitchFFN(nn.Module):
    """Top-1 routed FFN. forward(x[..., d]) -> (y[..., d], MoEStats); dropped tokens get y = 0."""

    def __init__(self, d_model: int, d_ff: int, moe_cfg: MoEConfig, ep_group: Optional[dist.ProcessGroup] = None,
                 *, layer: int = 0, bias: bool = True, init_std: float = 0.02, out_init_std: Optional[float] = None):
        super().__init__()
        self.cfg = moe_cfg
        self.layer = layer
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if moe_cfg.num_experts % self.ep_size:
            raise ValueError(f"expert-parallel size {self.ep_size} does not divide num_experts={moe_cfg.num_experts}")
        local = moe_cfg.num_experts // self.ep_size
        self.init_std = init_std
        self.out_init_std = out_init_std if out_init_std is not None else init_std
        self.router = nn.Linear(d_model, moe_cfg.num_experts, bias=False)
        # Expert weights stacked [E_local, in, out] so all experts run as one bmm.
        self.w_fc = nn.Parameter(torch.empty(local, d_model, d_ff))
        self.w_proj = nn.Parameter(torch.empty(local, d_ff, d_model))
        self.b_fc = nn.Parameter(torch.empty(local, 1, d_ff)) if bias else None
        self.b_proj = nn.Parameter(torch.empty(local, 1, d_model)) if bias else None
        for p in self.expert_parameters():
            p.expert = True  # the trainer's marker: own optimizer group, reduced over expert-data-parallel ranks
            p.allreduce = False  # DeepSpeed MoE's convention for the same thing
            p.group_name = f"ep_size_{self.ep_size}"
        self.reset_parameters()

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.w_fc, self.b_fc, self.w_proj, self.b_proj) if p is not None]

    def reset_parameters(self) -> None:
        scale = self.cfg.expert_init_scale
        nn.init.normal_(self.router.weight, std=self.init_std)
        nn.init.normal_(self.w_fc, std=self.init_std * scale)
        nn.init.normal_(self.w_proj, std=self.out_init_std * scale)
        for b in (self.b_fc, self.b_proj):
            if b is not None:
                nn.init.zeros_(b)

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
        logits = self.router_logits(tokens)
        probs = logits.softmax(dim=-1)
        gate, expert = probs.max(dim=-1)
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        capacity = expert_capacity(n, num_experts, factor)
        slot, counts = assign_slots(expert, num_experts, capacity)

        # Copy tokens into the [E, C, d] buffer; dropped tokens all land in one extra row, cut off.
        buffer = tokens.new_zeros(num_experts * capacity + 1, d).index_copy(0, slot, tokens)
        out = self.experts(buffer[:-1].view(num_experts, capacity, d)).view(num_experts * capacity, d)
        # Each token reads its slot back, scaled by its router probability; a dropped token's gate
        # is zeroed (it reads an arbitrary slot), so it leaves the layer as 0 and the residual carries it.
        kept = slot < num_experts * capacity
        gate = torch.where(kept, gate, 0.0).to(out.dtype)
        y = out.index_select(0, slot.clamp(max=num_experts * capacity - 1)) * gate.unsqueeze(1)

        routed_frac = counts.float() / n
        stats = MoEStats(
            layer=self.layer,
            expert_counts=counts.detach(),
            dropped_frac=(~kept).float().mean().detach(),
            aux_loss=num_experts * torch.sum(routed_frac * probs.mean(dim=0)),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
        )
        return y.view(x.shape), stats

    def experts(self, buffer: torch.Tensor) -> torch.Tensor:
        """[E, C, d] slots (all experts, this rank's tokens) -> expert outputs of the same shape."""
        num_experts, capacity, d = buffer.shape
        local, ep = num_experts // self.ep_size, self.ep_size
        # After the exchange, chunk r holds rank r's tokens for this rank's experts.
        received = self._exchange(buffer).view(ep, local, capacity, d)
        h = received.transpose(0, 1).reshape(local, ep * capacity, d)
        h = ExpertMLP.apply(*self.in_compute_dtype(h, self.w_fc, self.b_fc, self.w_proj, self.b_proj))
        h = h.view(local, ep, capacity, d).transpose(0, 1).reshape(num_experts, capacity, d)
        return self._exchange(h)

    @staticmethod
    def in_compute_dtype(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Cast to autocast's dtype when it is on (ExpertMLP runs with autocast off).

        The cast is part of the graph, so float32 parameters still receive float32 gradients.
        """
        device = tensors[0].device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensors[0].dtype
        return [None if t is None else t.to(dtype) for t in tensors]

    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        """All-to-all over the expert-parallel group: chunk r of dim 0 goes to rank r (autograd-aware)."""
        if self.ep_group is None:
            return t
        t = t.contiguous()
        return all_to_all_single(torch.empty_like(t), t, group=self.ep_group)
