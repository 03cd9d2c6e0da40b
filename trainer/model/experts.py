"""The experts of a Switch layer: E GELU or ReLU MLPs run as batched matmuls on their kept tokens only.

`SwitchExperts` holds the stacked expert weights and computes slot layout [R, E, C] from a
source of token rows; R is 1 on one device. The engine's expert parallelism (trainer/expert_parallel.py)
wraps it with the token all-to-all, so this file has no process groups.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _rows(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[rows]


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.bmm(x, weight)
    return out if bias is None else out.add_(bias)  # faster than baddbmm's broadcast bias on CPU


# GPT-2's tanh GELU written as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function.
# By hand because ATen's CPU tanh is much slower than its sigmoid, and one sigmoid gives the backward
# both the activation and the derivative (docs/benchmarks.md, Switch layer). GPUs and 16-bit dtypes
# keep ATen's fused kernels, which are faster there and compute in float32 inside.
_GELU_K, _GELU_B = 2 * math.sqrt(2 / math.pi), 0.044715


def _fused_gelu(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)


def _gelu_gate(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(2u), so that gelu(x) = x * gate; addcmul makes K + K B x^2 one pass over x, not three."""
    return torch.addcmul(x.new_tensor(_GELU_K), x, x, value=_GELU_K * _GELU_B).mul_(x).sigmoid_()


def _gelu(x: torch.Tensor) -> torch.Tensor:
    if _fused_gelu(x):
        return F.gelu(x, approximate="tanh")
    return _gelu_gate(x).mul_(x)


def _gelu_backward_(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad *= gelu'(x), in place; returns gelu(x), which the backward needs for w_proj's gradient.

    gelu'(x) = s + q (1 - s) = lerp(q, 1, s) with s = sigmoid(2u), q = x s 2u'(x),
    2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """
    if _fused_gelu(x):
        torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=grad)
        return F.gelu(x, approximate="tanh")
    gate = _gelu_gate(x)
    act = gate * x
    q = torch.addcmul(x.new_tensor(_GELU_K), x, x, value=3 * _GELU_K * _GELU_B).mul_(act)
    grad.mul_(q.lerp_(x.new_tensor(1.0), gate))
    return act


def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    return F.relu(x) if name == "relu" else _gelu(x)


def _activation_backward_(grad: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """grad *= act'(x), in place; returns act(x), which the backward needs for w_proj's gradient."""
    if name == "relu":
        grad.masked_fill_(x <= 0, 0.0)
        return F.relu(x)
    return _gelu_backward_(grad, x)


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
    """act(x @ w_fc + b_fc) @ w_proj^T + b_proj for each expert, on its kept tokens only (act: gelu or relu).

    Slot s of the layout [R, E, C] reads row index[s] of `source` [m, d]; block [r, j] holds source
    r's tokens for expert j in its first rows[r][j] slots, the rest is capacity padding (output 0,
    gradient 0). Experts run in groups of consecutive experts, one bmm per group up to its largest
    kept count, so padding costs no FLOPs while small experts still share a batched matmul.

    A Function for memory's sake: it saves only each group's gathered input and pre-activation (the
    activation is recomputed), and its backward uses grad_out's rows as scratch. It keeps them on ctx
    and frees each group's as its gradients are written (so no retain_graph); under activation
    checkpointing (`recompute`) it saves them through save_for_backward, which checkpointing releases
    after forward and recomputes, but which autograd keeps until the whole backward ends.
    """

    @staticmethod
    def forward(ctx, source, index, rows, w_fc, b_fc, w_proj, b_proj, activation="gelu", recompute=False):
        ep, local, d_out = len(rows), w_fc.shape[0], w_proj.shape[1]
        ctx.activation = activation
        index = index.view(ep, local, -1)
        ctx.source_shape = source.shape
        ctx.groups = ExpertMLP.groups(rows, capacity=index.shape[2], device=source.device.type)
        out = source.new_zeros(*index.shape, d_out)
        activations = []  # (input rows, pre-activation) per group
        with torch.autocast(source.device.type, enabled=False):
            for r, experts, k in ctx.groups:
                rows_in = source.index_select(0, index[r, experts, :k].flatten()).view(-1, k, source.shape[1])
                pre = _affine(rows_in, w_fc[experts], _rows(b_fc, experts))
                out[r, experts, :k] = _affine(_activation(pre, activation), w_proj[experts].transpose(1, 2),
                                              _rows(b_proj, experts))
                activations += [rows_in, pre]
        ctx.save_for_backward(index, w_fc, b_fc, w_proj, b_proj, *(activations if recompute else []))
        ctx.recompute, ctx.activations = recompute, None if recompute else activations
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        index, w_fc, b_fc, w_proj, b_proj, *activations = ctx.saved_tensors
        if not ctx.recompute:
            if ctx.activations is None:
                raise RuntimeError("ExpertMLP frees its activations in backward: retain_graph is not supported")
            activations, ctx.activations = ctx.activations, None
        grad_out = grad_out.contiguous()
        grad_source = grad_out.new_zeros(ctx.source_shape)
        # An expert's first group writes its weight gradients (out=), later groups add, experts without tokens get 0.
        grads = {name: None if t is None else torch.empty_like(t)
                 for name, t in (("w_fc", w_fc), ("b_fc", b_fc), ("w_proj", w_proj), ("b_proj", b_proj))}
        written = torch.zeros(w_fc.shape[0], dtype=torch.bool)
        with torch.autocast(grad_out.device.type, enabled=False):
            for i, (r, experts, k) in enumerate(ctx.groups):
                rows_in, pre = activations[2 * i], activations[2 * i + 1]
                activations[2 * i] = activations[2 * i + 1] = None  # on ctx: freed once used below
                g = grad_out[r, experts, :k]
                first = not written[experts].any()
                written[experts] = True
                # The activation's backward right after the bmm that writes grad_pre, while it is still in cache.
                grad_pre = torch.bmm(g, w_proj[experts])
                act = _activation_backward_(grad_pre, pre, ctx.activation)
                _bmm_into(grads["w_proj"][experts], g.transpose(1, 2), act, first)
                del act
                if grads["b_proj"] is not None:
                    _sum_into(grads["b_proj"][experts], g, first)
                _bmm_into(grads["w_fc"][experts], rows_in.transpose(1, 2), grad_pre, first)
                del rows_in, pre
                if grads["b_fc"] is not None:
                    _sum_into(grads["b_fc"][experts], grad_pre, first)
                torch.bmm(grad_pre, w_fc[experts].transpose(1, 2), out=g)  # g is used up: its rows are scratch
                grad_source.index_add_(0, index[r, experts, :k].flatten(), g.reshape(-1, g.shape[-1]))
            for j in (~written).nonzero().flatten().tolist():
                for grad in grads.values():
                    if grad is not None:
                        grad[j].zero_()
        return grad_source, None, None, grads["w_fc"], grads["b_fc"], grads["w_proj"], grads["b_proj"], None, None

    @staticmethod
    def groups(rows: list[list[int]], capacity: int, device: str = "cpu") -> list[tuple[int, slice, int]]:
        """(source, experts, rows to compute) per group of about GROUP_ROWS[device] slots; empty groups left out."""
        step = max(1, ExpertMLP.GROUP_ROWS.get(device, ExpertMLP.GROUP_ROWS["cpu"]) // capacity)
        groups = []
        for r, kept in enumerate(rows):
            for j in range(0, len(kept), step):
                k = max(kept[j:j + step])
                if k:
                    groups.append((r, slice(j, min(j + step, len(kept))), k))
        return groups

    # Slots per group. CPU: enough rows for full-speed small bmm's, few enough for a small [rows, d_ff]
    # activation. GPU: kernel launches dominate small layers, so fewer, larger groups.
    GROUP_ROWS = {"cpu": 512, "cuda": 8192}


class SwitchExperts(nn.Module):
    """`num_experts` GELU (or ReLU) MLPs with weights stacked [E, d_model, d_ff] (w_proj as nn.Linear's
    [out, in]), the layout whose batched matmuls run fastest on CPU. forward(source, index, rows) -> [R, E, C, d]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.recompute = False  # set by activation checkpointing (trainer.engine): how ExpertMLP saves activations
        self.w_fc = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_fc = nn.Parameter(torch.empty(num_experts, 1, d_ff)) if bias else None
        self.b_proj = nn.Parameter(torch.empty(num_experts, 1, d_model)) if bias else None

    @property
    def num_experts(self) -> int:
        return self.w_fc.shape[0]

    def forward(self, source: torch.Tensor, index: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        """Slot [r, e, c] computes row index[r, e, c] of source [m, d]; rows[r][e] leading slots are kept."""
        source, *params = in_compute_dtype(self.w_fc, self.b_fc, self.w_proj, self.b_proj, like=source)
        return ExpertMLP.apply(source, index, rows, *params, self.activation, self.recompute)


def in_compute_dtype(*params: Optional[torch.Tensor], like: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """[like, *params] in autocast's dtype when it is on (ExpertMLP runs with autocast off), else in
    like's dtype. The cast is part of the graph, so float32 parameters still get float32 gradients."""
    device = like.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
    return [None if t is None else t.to(dtype) for t in (like, *params)]
