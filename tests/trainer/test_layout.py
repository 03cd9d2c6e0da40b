"""Layout invariance: the same config and global batch trained in different layouts (processes, ZeRO
stage, expert parallelism) starts from the same weights exactly and gives the same losses step by step,
to fp32 reduction-order tolerance. Routing capacity is per micro-batch, so every layout keeps micro batch 4."""
from __future__ import annotations

import os

import pytest
import torch

from tests.trainer.conftest import free_port, make_run, read_metrics, run_training
from trainer import testing_hooks
from trainer.weight_shards import ShardedWeights

# fp32 sums in another order (gradient all-reduce vs accumulation, ZeRO's flat buffers) move the loss
# by ~1e-7 relative per step; 10 Adam steps keep it well below this.
LOSS_RTOL = 1e-5
LAYOUTS = {  # (processes, ZeRO stage, ep_size): one process accumulates 2 micro-batches of 4, two take one each
    "tiny-gpt": [(1, 0, 1), (2, 1, 1), (2, 2, 1), (2, 3, 1)],
    "tiny-switch": [(1, 0, 1), (2, 2, 2)],
}


def train(tmp_path, shard_dir, model, nproc, zero, ep):
    run = make_run(tmp_path / f"{model}-{nproc}-{zero}-{ep}", shard_dir, model=model,
                   train={"max_steps": 10, "micro_batch_size": 4, "global_batch_size": 8},
                   parallel={"zero_stage": zero, "ep_size": ep}, checkpoint={"interval": 10})
    os.environ[testing_hooks.SAVE_AT_START] = "1"
    try:
        run_training(run, nproc=nproc, port=free_port())
    finally:
        del os.environ[testing_hooks.SAVE_AT_START]
    initial = dict(ShardedWeights(run / "checkpoints" / "step-0").tensors())
    return initial, [read_metrics(run)[s]["loss"] for s in range(1, 11)]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("model", sorted(LAYOUTS))
def test_same_weights_and_losses_in_every_layout(tmp_path, shard_dir, model):
    (nproc, zero, ep), *others = LAYOUTS[model]
    weights, losses = train(tmp_path, shard_dir, model, nproc, zero, ep)
    for layout in others:
        other_weights, other_losses = train(tmp_path, shard_dir, model, *layout)
        assert other_weights.keys() == weights.keys()
        assert all(torch.equal(other_weights[k], weights[k]) for k in weights), layout
        for step, (a, b) in enumerate(zip(losses, other_losses), start=1):
            assert abs(a - b) <= LOSS_RTOL * abs(a), (layout, step, a, b)
