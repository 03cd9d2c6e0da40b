"""Switch Transformer top-1 mixture-of-experts FFN (Fedus et al. 2021) with ST-MoE's router z-loss.

Dispatch costs O(tokens x d_model): tokens are sorted by expert, each gets a slot
`expert * capacity + position` in an [E, C, d] buffer, each expert runs on the kept tokens at
the head of its slots (the capacity padding costs no FLOPs), and each token gathers its result
back. There is no [tokens, experts, capacity] one-hot.

Expert parallelism is one code path with the single-device case: with an `ep_group` of
size ep, this rank holds E/ep experts, and the [E, C, d] buffer and the per-expert kept-token
counts are exchanged with all-to-all (differentiable for the buffer) so each rank computes
[ep, E/ep, C, d] for its own experts. Without a group the exchange is skipped. Capacity is
computed from this rank's tokens, so every rank in the group must pass the same number of
tokens (fixed micro batch and sequence length).
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


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.bmm(x, weight)
    return out if bias is None else out.add_(bias)  # measured faster than baddbmm's broadcast bias on CPU


# tanh-GELU (GPT-2's) written as x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3): the same
# function, since (1 + tanh u) / 2 = sigmoid(2u). Why by hand: on CPU ATen's vectorised tanh is 3.5x
# slower than its sigmoid (1.08 vs 0.30 ms on 512k floats), and the backward gets the activation and
# its derivative from one sigmoid instead of two tanh passes: 0.88 ms against 2.3 per [25, 20, 1024]
# group. On a GPU the fused kernels (F.gelu, gelu_backward) are faster than these few passes, and in
# 16-bit dtypes they are more accurate (they compute in float32 inside; the passes would round each step).
_GELU_K, _GELU_B = 2 * math.sqrt(2 / math.pi), 0.044715


def _fused_gelu(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)


def _gelu_gate(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(2u), so that gelu(x) = x * gate."""
    return x.square().mul_(_GELU_K * _GELU_B).add_(_GELU_K).mul_(x).sigmoid_()


def _gelu(x: torch.Tensor) -> torch.Tensor:
    if _fused_gelu(x):
        return F.gelu(x, approximate="tanh")
    return _gelu_gate(x).mul_(x)


def _gelu_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad *= gelu'(x), in place; returns gelu(x), which the backward needs for w_proj's gradient.

    gelu'(x) = s + x s (1 - s) 2u'(x) with s = sigmoid(2u), 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """
    if _fused_gelu(x):
        torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=grad)
        return F.gelu(x, approximate="tanh")
    gate = _gelu_gate(x)
    act = gate * x
    q = x.square().mul_(3 * _GELU_K * _GELU_B).add_(_GELU_K).mul_(act)  # x s 2u'
    q.addcmul_(q, gate, value=-1).add_(gate)  # q (1 - s) + s
    grad.mul_(q)
    return act


def _bmm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    if first:
        torch.bmm(a, b, out=dst)
    else:
        dst.baddbmm_(a, b)


def _sum_into(dst: torch.Tensor, rows: torch.Tensor, first: bool) -> None:
    if first:
        torch.sum(rows, dim=1, keepdim=True, out=dst)
    else:
        dst.add_(rows.sum(dim=1, keepdim=True))


class ExpertMLP(torch.autograd.Function):
    """gelu(x @ w_fc + b_fc) @ w_proj^T + b_proj for each expert, on its kept tokens only.

    Both weights are stored [E_local, d_model, d_ff] (w_proj as nn.Linear stores an [out, in]
    weight): on CPU that layout runs w_proj's three products about 15% faster than [E, d_ff, d_model]
    (its backward product is then a plain, not a transposed, matmul); w_fc's is fastest as it is.

    The input is gathered: slot s of the slot layout [ep, E_local, C] reads row index[s] of
    `source` [m, d]. Block [r, j] holds source rank r's tokens for local expert j in its first
    rows[r][j] slots; the other slots are capacity padding and may point at any row. On one
    device `source` is the layer's tokens, so no [slots, d] copy of them is ever built; with
    expert parallelism it is the received all-to-all buffer and `index` counts up.

    The experts run in groups of consecutive experts, one bmm per group over the group's largest
    kept count, so padding past it (a fifth of the slots or more at capacity factor 1.25) costs
    no FLOPs, while experts with few tokens each still share one batched matmul (a matmul per
    expert runs at half speed on small blocks). Padding rows inside a group are computed but
    never read with a non-zero weight, so they get zero gradient. Output rows past a group's
    count are 0.

    A Function also for memory's sake: plain autograd would keep a [slots, d] input and two
    [slots, d_ff] activations. The forward keeps, per group, its gathered input rows and its
    pre-activation (GELU is recomputed from it); the backward frees both as soon as it has
    written that group's gradients, so activation memory drains while the weight gradients fill
    up. It scatters the input gradient straight into a [m, d] gradient of `source`, using
    grad_out's rows as scratch (SwitchFFN hands it over fresh and never reads it again). The
    backward can therefore run only once (no retain_graph). Tensors arrive in the compute dtype
    (SwitchFFN.in_compute_dtype).
    """

    @staticmethod
    def forward(ctx, source, index, rows, w_fc, b_fc, w_proj, b_proj):
        ep, local, d_out = len(rows), w_fc.shape[0], w_proj.shape[1]
        index = index.view(ep, local, -1)
        ctx.save_for_backward(index, w_fc, b_fc, w_proj, b_proj)
        ctx.source_shape = source.shape
        ctx.groups = ExpertMLP.groups(rows, capacity=index.shape[2], device=source.device.type)
        out = source.new_zeros(*index.shape, d_out)
        ctx.activations = []  # (input rows, pre-activation) per group: on ctx so backward can free them
        with torch.autocast(source.device.type, enabled=False):
            for r, experts, k in ctx.groups:
                rows_in = source.index_select(0, index[r, experts, :k].flatten()).view(-1, k, source.shape[1])
                pre = _affine(rows_in, w_fc[experts], _rows(b_fc, experts))
                out[r, experts, :k] = _affine(_gelu(pre), w_proj[experts].transpose(1, 2), _rows(b_proj, experts))
                ctx.activations.append((rows_in, pre))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.activations is None:
            raise RuntimeError("ExpertMLP frees its activations in backward: retain_graph is not supported")
        index, w_fc, b_fc, w_proj, b_proj = ctx.saved_tensors
        activations, ctx.activations = ctx.activations, None
        grad_out = grad_out.contiguous()
        grad_source = grad_out.new_zeros(ctx.source_shape)
        # Weight gradients are written, not zeroed and then added to: an expert's first group
        # writes them (out=), groups from other source ranks add, experts with no tokens get 0.
        grads = {name: None if t is None else torch.empty_like(t)
                 for name, t in (("w_fc", w_fc), ("b_fc", b_fc), ("w_proj", w_proj), ("b_proj", b_proj))}
        written = torch.zeros(w_fc.shape[0], dtype=torch.bool)
        with torch.autocast(grad_out.device.type, enabled=False):
            for i, (r, experts, k) in enumerate(ctx.groups):
                (rows_in, pre), activations[i] = activations[i], None
                g = grad_out[r, experts, :k]
                first = not written[experts].any()
                written[experts] = True
                # The GELU passes run right after the bmm that writes grad_pre, while it and pre are
                # still in cache (a weight-gradient bmm in between streams the group's weights through).
                grad_pre = torch.bmm(g, w_proj[experts])
                act = _gelu_backward_(grad_pre, pre)
                del pre
                _bmm_into(grads["w_proj"][experts], g.transpose(1, 2), act, first)
                del act
                if grads["b_proj"] is not None:
                    _sum_into(grads["b_proj"][experts], g, first)
                _bmm_into(grads["w_fc"][experts], rows_in.transpose(1, 2), grad_pre, first)
                del rows_in
                if grads["b_fc"] is not None:
                    _sum_into(grads["b_fc"][experts], grad_pre, first)
                torch.bmm(grad_pre, w_fc[experts].transpose(1, 2), out=g)  # g is used up: its rows are scratch
                grad_source.index_add_(0, index[r, experts, :k].flatten(), g.reshape(-1, g.shape[-1]))
            for j in (~written).nonzero().flatten().tolist():
                for grad in grads.values():
                    if grad is not None:
                        grad[j].zero_()
        return grad_source, None, None, grads["w_fc"], grads["b_fc"], grads["w_proj"], grads["b_proj"]

    @staticmethod
    def groups(rows: list[list[int]], capacity: int, device: str = "cpu") -> list[tuple[int, slice, int]]:
        """(source rank, local experts, rows to compute) per group; groups with no tokens are left out.

        A group spans about GROUP_ROWS[device] slots (at least one expert) and computes up to the
        largest kept count among its experts.
        """
        step = max(1, ExpertMLP.GROUP_ROWS.get(device, ExpertMLP.GROUP_ROWS["cpu"]) // capacity)
        groups = []
        for r, kept in enumerate(rows):
            for j in range(0, len(kept), step):
                k = max(kept[j:j + step])
                if k:
                    groups.append((r, slice(j, min(j + step, len(kept))), k))
        return groups

    # Slots per group. CPU: enough rows that a group's bmm runs at full speed on small experts (of
    # 128, 256 and 512 measured on the benchmark shapes, 512 was fastest), few enough that its
    # [rows, d_ff] activation stays small (2 MiB at d_ff 1024 in fp32). GPU: kernel launches, not
    # FLOPs, dominate small layers, so far fewer, larger groups (one for the benchmark's 2,560 slots).
    GROUP_ROWS = {"cpu": 512, "cuda": 8192}


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
        # Expert weights stacked [E_local, d_model, d_ff] so experts run as batched matmuls (the
        # layout that is fastest on CPU, see ExpertMLP); the layer computes gelu(x @ w_fc) @ w_proj^T.
        self.w_fc = nn.Parameter(torch.empty(local, d_model, d_ff))
        self.w_proj = nn.Parameter(torch.empty(local, d_model, d_ff))
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

        # Slot s of the [E, C] layout holds token token_of_slot[s]. Padding slots point at token 0,
        # a finite stand-in that the experts skip or whose output is never read.
        slots = num_experts * capacity
        token_of_slot = torch.zeros(slots + 1, dtype=torch.long, device=x.device)
        token_of_slot[slot] = torch.arange(n, device=x.device)  # dropped tokens all land in the extra entry
        kept_rows = counts.clamp(max=capacity)  # the first kept_rows[e] slots of expert e hold its tokens
        out = self.experts(tokens, token_of_slot[:slots], kept_rows, capacity).view(slots, d)
        # Each token reads its slot back, scaled by its router probability; a dropped token's gate
        # is zeroed (it reads an arbitrary slot), so it leaves the layer as 0 and the residual carries it.
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

    def experts(self, tokens: torch.Tensor, token_of_slot: torch.Tensor, kept_rows: torch.Tensor,
                capacity: int) -> torch.Tensor:
        """Expert outputs [E, C, d] for the slots of all experts (this rank's tokens).

        kept_rows[e] is how many leading slots of expert e hold tokens; the experts skip the rest.
        """
        num_experts, d = kept_rows.shape[0], tokens.shape[1]
        local, ep = num_experts // self.ep_size, self.ep_size
        if self.ep_group is None:  # every expert is here: the experts gather straight from the tokens
            source, index = tokens, token_of_slot
        else:  # after the exchange, block [r, j] holds rank r's tokens for this rank's local expert j
            source = self._exchange(tokens.index_select(0, token_of_slot))
            index = torch.arange(source.shape[0], device=source.device)
        with torch.no_grad():  # rows[r][j]: how many tokens rank r sent to local expert j
            rows = self._exchange(kept_rows).view(ep, local).tolist()
        source, *params = self.in_compute_dtype(self.w_fc, self.b_fc, self.w_proj, self.b_proj, like=source)
        h = ExpertMLP.apply(source, index, rows, *params)
        return self._exchange(h.view(num_experts, capacity, d))

    @staticmethod
    def in_compute_dtype(*params: Optional[torch.Tensor], like: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """The activations `like` and the parameters in autocast's dtype when it is on (ExpertMLP
        runs with autocast off), else in the activations' dtype. Returns [like, *params].

        The cast is part of the graph, so float32 parameters still receive float32 gradients.
        """
        device = like.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
        return [None if t is None else t.to(dtype) for t in (like, *params)]

    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        """All-to-all over the expert-parallel group: chunk r of dim 0 goes to rank r (autograd-aware)."""
        if self.ep_group is None:
            return t
        t = t.contiguous()
        if not t.requires_grad:
            out = torch.empty_like(t)
            dist.all_to_all_single(out, t, group=self.ep_group)
            return out
        return all_to_all_single(torch.empty_like(t), t, group=self.ep_group)
