"""Switch top-1 MoE layer: against a loop reference, losses, gradients, precision, memory shape,
expert marking, and the expert-parallel path over a real 2-process gloo group."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainer.config import ModelConfig, MoEConfig
from trainer.distributed import free_port
from trainer.expert_parallel import apply_expert_parallel, is_expert
from trainer.model import GPT, SwitchFFN

D_MODEL, D_FF = 16, 32


def make_layer(num_experts=4, skew=0.0, seed=0, **moe_kw) -> SwitchFFN:
    """A layer whose router prefers expert 0 by `skew`, so capacity is exceeded and tokens drop."""
    torch.manual_seed(seed)
    layer = SwitchFFN(D_MODEL, D_FF, MoEConfig(num_experts=num_experts, **moe_kw))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero biases, visible expert outputs
    return layer


def reference_switch(layer: SwitchFFN, x: torch.Tensor, capacity_factor: float):
    """Plain per-token loop: the first `capacity` tokens routed to an expert are kept, the rest dropped."""
    tokens = x.reshape(-1, x.shape[-1]).float()
    probs = (tokens @ layer.router.weight.float().T).softmax(-1)
    n, num_experts = probs.shape
    capacity = math.ceil(n / num_experts * capacity_factor)
    filled, dropped, y = [0] * num_experts, 0, torch.zeros_like(tokens)
    for t in range(n):
        e = int(probs[t].argmax())
        if filled[e] == capacity:
            dropped += 1
            continue
        filled[e] += 1
        experts = layer.experts
        h = F.gelu(tokens[t] @ experts.w_fc[e] + experts.b_fc[e, 0], approximate="tanh")
        y[t] = probs[t, e] * (h @ experts.w_proj[e].T + experts.b_proj[e, 0])
    counts = torch.bincount(probs.argmax(-1), minlength=num_experts)
    return y.view(x.shape), counts, dropped / n


def skewed_input(n=64, seed=1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(n, D_MODEL)
    x[: n // 2, 0] += 3.0  # half the tokens lean towards whichever expert likes feature 0
    return x


@pytest.mark.parametrize("train,factor", [(True, 1.0), (False, 2.0)])
def test_matches_loop_reference(train, factor):
    layer = make_layer(capacity_factor=1.0, eval_capacity_factor=2.0)
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    layer.train(train)
    x = skewed_input().view(4, 16, D_MODEL)
    with torch.no_grad():
        y, stats = layer(x)
        y_ref, counts_ref, dropped_ref = reference_switch(layer, x, factor)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    assert stats.expert_counts.tolist() == counts_ref.tolist()
    assert stats.dropped_frac.item() == pytest.approx(dropped_ref)
    assert 0 < dropped_ref < 0.5  # the case exercises dropping, yet routes most tokens


def test_eval_mode_uses_eval_capacity_factor():
    layer = make_layer(capacity_factor=1.0, eval_capacity_factor=3.0)
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    x = skewed_input()
    with torch.no_grad():
        train_dropped = layer.train()(x)[1].dropped_frac.item()
        eval_dropped = layer.eval()(x)[1].dropped_frac.item()
    assert train_dropped > 0 and eval_dropped == 0


def test_aux_loss_is_one_for_uniform_routing():
    num_experts = 4
    layer = make_layer(num_experts=num_experts)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :num_experts] = 5.0 * torch.eye(num_experts)
    # Each expert gets the same tokens up to a permutation: f_i = P_i = 1/E.
    x = torch.eye(num_experts, D_MODEL).repeat(8, 1)
    _, stats = layer(x)
    assert stats.expert_counts.tolist() == [8] * num_experts
    assert stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        layer.router.weight[0, 1:num_experts] = 5.0  # everything prefers expert 0 now
    assert layer(x)[1].aux_loss.item() > 1.5


def test_gradients_reach_router_and_experts():
    layer = make_layer()
    y, stats = layer(skewed_input())
    (y.square().sum() + stats.aux_loss + stats.z_loss).backward()
    experts = layer.experts
    for p in (layer.router.weight, experts.w_fc, experts.w_proj, experts.b_fc, experts.b_proj):
        assert p.grad is not None and p.grad.abs().sum() > 0
    layer.zero_grad()
    layer(skewed_input())[0].sum().backward()  # through the gate probability alone
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_runs_in_float32_under_bf16():
    layer = make_layer()
    x = skewed_input().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
        y, stats = layer(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ layer.router.weight.T)
    assert torch.isfinite(y).all() and stats.z_loss.dtype == torch.float32


def test_jitter_only_in_training():
    layer = make_layer(jitter=0.1)
    x = skewed_input()
    assert not torch.equal(layer.train().router_logits(x), layer.router_logits(x))
    assert torch.equal(layer.eval().router_logits(x), layer.router_logits(x))


def one_expert(layer: SwitchFFN, token: torch.Tensor, e: int) -> torch.Tensor:
    w = layer.experts
    return F.gelu(token @ w.w_fc[e] + w.b_fc[e, 0], approximate="tanh") @ w.w_proj[e].T + w.b_proj[e, 0]


# Sequence 0 sends all 8 tokens to expert 0; sequence 1 sends two to each expert. Capacity factor 1.0.
ROUTE = torch.tensor([[0] * 8, [0, 0, 1, 1, 2, 2, 3, 3]])
KEPT = {  # routing group -> (capacity, kept tokens)
    "batch": (4, [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]]),  # seq 1's expert-0 tokens come 9th and 10th
    "sequence": (2, [[1, 1, 0, 0, 0, 0, 0, 0], [1] * 8]),
    4: (1, [[1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]]),  # Mesh TensorFlow groups of 4 tokens
    ("sequence", 3): (3, [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]),  # fixed expert_capacity (HF SwitchTransformers)
}


@pytest.mark.parametrize("group", KEPT, ids=str)
def test_capacity_is_per_routing_group(group):
    routing_group, fixed = group if isinstance(group, tuple) else (group, None)
    layer = make_layer(capacity_factor=1.0, routing_group=routing_group, expert_capacity=fixed).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :4] = 5.0 * torch.eye(4)
    x = F.one_hot(ROUTE, D_MODEL).float() + 0.1 * torch.randn(2, 8, D_MODEL)
    capacity, kept = KEPT[group]
    with torch.no_grad():
        y, stats = layer(x)
        r = layer.route(x)
    assert r.capacity == capacity and r.expert.tolist() == ROUTE.flatten().tolist()
    assert (r.slot < 4 * r.slots_per_expert).view(2, 8).int().tolist() == kept
    assert stats.dropped_frac.item() == pytest.approx(1 - sum(map(sum, kept)) / 16)
    for b, t in ((b, t) for b in range(2) for t in range(8)):
        expected = r.gate[8 * b + t] * one_expert(layer, x[b, t], int(ROUTE[b, t]))
        torch.testing.assert_close(y[b, t], expected if kept[b][t] else torch.zeros(D_MODEL), atol=1e-6, rtol=1e-5)
    # Load balancing per group, averaged (Mesh TensorFlow): E * sum_e f_e * P_e of each group.
    groups = r.group_counts.shape[0]
    per_group = [4 * (F.one_hot(e, 4).float().mean(0) * p.mean(0)).sum()
                 for e, p in zip(r.expert.chunk(groups), r.probs.chunk(groups))]
    assert stats.aux_loss.item() == pytest.approx(torch.stack(per_group).mean().item())


def test_routing_groups_must_divide_the_batch():
    layer = make_layer(routing_group=5)
    with pytest.raises(ValueError, match="model.moe.routing_group: groups of 5 tokens do not divide the 16"):
        layer(torch.randn(2, 8, D_MODEL))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_dispatch_never_builds_tokens_x_experts_x_capacity():
    n, num_experts, d = 512, 256, 64
    torch.manual_seed(0)
    layer = SwitchFFN(d, 4, MoEConfig(num_experts=num_experts, capacity_factor=4.0))
    capacity = math.ceil(n / num_experts * 4.0)
    x = torch.randn(n, d, requires_grad=True)
    with LargestTensor() as probe:
        y, stats = layer(x)
        (y.sum() + stats.aux_loss).backward()
    # The largest legitimate tensors are the [E*C + 1, d] slot buffer (a zero row for dropped
    # tokens) and the [n, E] router logits.
    assert probe.numel <= max((num_experts * capacity + 1) * d, n * num_experts)
    assert probe.numel * 4 <= n * num_experts * capacity


def test_expert_parameters_are_marked():
    layer = make_layer()
    apply_expert_parallel(layer, ep_size=1)
    experts = {id(p) for p in layer.expert_parameters()}
    assert len(experts) == 4
    for p in layer.parameters():
        assert is_expert(p) == (id(p) in experts)
        if is_expert(p):
            assert p.allreduce is False and p.group_name == "ep_size_1"


def test_gpt_with_moe_reports_losses_and_stats():
    moe = MoEConfig(num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.25)
    cfg = ModelConfig(n_layer=4, n_head=2, d_model=16, n_ctx=32, vocab_size=50, moe=moe)
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 32))
    out = model(idx, targets=idx)
    assert [s.layer for s in out.moe] == [1, 3]
    assert all(s.expert_counts.sum().item() == 64 for s in out.moe)
    torch.testing.assert_close(out.aux_loss, torch.stack([s.aux_loss for s in out.moe]).mean())
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    out.loss.backward()
    assert model.transformer.h[1].mlp.router.weight.grad.abs().sum() > 0


def _sharded_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = make_layer(capacity_factor=1.0)  # same seed on every rank: the same 4 experts
        sharded = make_layer(capacity_factor=1.0)
        apply_expert_parallel(sharded, ep_size=2, group=dist.group.WORLD)  # keeps this rank's 2 experts
        local = slice(2 * rank, 2 * rank + 2)
        for name in ("w_fc", "b_fc", "w_proj", "b_proj"):
            assert torch.equal(getattr(sharded.experts, name), getattr(full.experts, name)[local])
        x = skewed_input(seed=10 + rank)  # each rank routes its own tokens
        outputs = []
        for layer in (full, sharded):
            y, stats = layer(x)
            (y.square().sum() + stats.aux_loss).backward()
            outputs.append((y, stats))
        (y_full, s_full), (y_sharded, s_sharded) = outputs
        torch.testing.assert_close(y_sharded, y_full)
        assert s_sharded.expert_counts.tolist() == s_full.expert_counts.tolist()
        assert s_sharded.dropped_frac.item() == s_full.dropped_frac.item() > 0
        torch.testing.assert_close(sharded.router.weight.grad, full.router.weight.grad)
        # A local expert processes every rank's tokens: its gradient is the sum over ranks of
        # the single-process gradients for that expert.
        for name in ("w_fc", "b_fc", "w_proj", "b_proj"):
            summed = getattr(full.experts, name).grad.clone()
            dist.all_reduce(summed)
            torch.testing.assert_close(getattr(sharded.experts, name).grad, summed[local])
        assert sharded.experts.w_fc.group_name == "ep_size_2"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiproc
def test_expert_parallel_matches_single_process():
    mp.spawn(_sharded_worker, args=(2, free_port()), nprocs=2, join=True)


@pytest.mark.parametrize("group_rows", [1, 8, 512])  # one expert per group, two, all of them
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("recompute", [False, True])  # activations on ctx, or saved for checkpointing
def test_expert_mlp_matches_plain_autograd(bias, group_rows, activation, recompute, monkeypatch):
    from trainer.model.experts import ExpertMLP

    monkeypatch.setattr(ExpertMLP, "GROUP_ROWS", {"cpu": group_rows})
    torch.manual_seed(0)
    ep, local, capacity, d, ff, m = 2, 3, 4, 8, 5, 10
    # Ragged kept rows per (source rank, local expert): full, partial, and empty blocks; local
    # expert 2 gets no tokens from any rank, so its gradients must be exactly 0.
    rows = [[4, 1, 0], [2, 0, 0]]
    shapes = [(m, d), (local, d, ff), (local, 1, ff) if bias else None,
              (local, d, ff), (local, 1, d) if bias else None]
    inputs = [None if s is None else torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    source, w_fc, b_fc, w_proj, b_proj = inputs
    index = torch.randint(0, m, (ep * local * capacity,))  # slots read source rows, some twice
    kept = (torch.arange(capacity) < torch.tensor(rows).unsqueeze(-1)).unsqueeze(-1)  # [ep, local, C, 1]
    # SwitchFFN never reads a padding slot's output with a non-zero weight, so their gradient is 0.
    grad_out = torch.randn(ep, local, capacity, d, dtype=torch.float64) * kept

    out = ExpertMLP.apply(source, index, rows, w_fc, b_fc, w_proj, b_proj, activation, recompute)
    out.backward(grad_out.clone())  # ExpertMLP uses the gradient it is given as scratch
    ours = [None if t is None else t.grad for t in inputs]
    for t in inputs:
        if t is not None:
            t.grad = None
    x = source[index].view(ep, local, capacity, d)
    pre = x @ w_fc + (b_fc if bias else 0)
    h = F.relu(pre) if activation == "relu" else F.gelu(pre, approximate="tanh")
    reference = h @ w_proj.transpose(1, 2) + (b_proj if bias else 0)
    reference.backward(grad_out)
    torch.testing.assert_close(out * kept, reference.detach() * kept)
    for mine, t in zip(ours, inputs):
        if t is not None:
            torch.testing.assert_close(mine, t.grad)
    assert ours[1][2].abs().max() == 0 and ours[3][2].abs().max() == 0
    if not recompute:  # each group's activations were freed in backward: a second backward is refused
        with pytest.raises(RuntimeError, match="retain_graph"):
            out = ExpertMLP.apply(source, index, rows, w_fc, b_fc, w_proj, b_proj, activation, recompute)
            out.backward(grad_out.clone(), retain_graph=True)
            out.backward(grad_out.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_expert_gelu_matches_atens_tanh_gelu(dtype):
    """ExpertMLP's GELU (x * sigmoid(2u) on CPU in fp32/fp64, ATen's fused kernels otherwise) is
    GPT-2's tanh GELU, and its backward is ATen's gelu_backward."""
    from trainer.model.experts import _gelu, _gelu_backward_

    torch.manual_seed(0)
    x = (torch.randn(3, 7, 64, dtype=torch.float64) * 4).to(dtype)  # tails where the gate saturates
    grad = torch.randn_like(x)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
           torch.bfloat16: dict(rtol=0, atol=0)}[dtype]
    torch.testing.assert_close(_gelu(x), F.gelu(x, approximate="tanh"), **tol)
    ours = grad.clone()
    act = _gelu_backward_(ours, x)
    torch.testing.assert_close(act, F.gelu(x, approximate="tanh"), **tol)
    torch.testing.assert_close(ours, torch.ops.aten.gelu_backward(grad, x, approximate="tanh"), **tol)
