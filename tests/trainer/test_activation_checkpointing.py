"""Activation checkpointing works for every block, Switch layers included: identical gradients, and a
measured saving of at least half what the planner (cluster/plan.py) says it saves."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer.conftest import REPO
from trainer.config import ModelConfig, MoEConfig
from trainer.engine import apply_activation_checkpointing
from trainer.model import GPT
from trainer.model.experts import SwitchExperts

CFG = dict(n_layer=8, n_head=4, d_model=256, n_ctx=512, vocab_size=1000, moe=dict(num_experts=8))
BATCH, SEQ = 8, 512


def gradients(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=4, n_head=4, d_model=64, n_ctx=128, vocab_size=500,
                            moe=MoEConfig(num_experts=4, jitter=0.1)))
    if checkpointing:
        apply_activation_checkpointing(model)
        # The experts then save through save_for_backward, which checkpointing releases and recomputes.
        assert [m.recompute for m in model.modules() if isinstance(m, SwitchExperts)] == [True, True]
    torch.manual_seed(1)  # the router's jitter: checkpointing replays the same noise in the recomputation
    idx = torch.randint(0, 500, (4, 128))
    out = model(idx, idx)
    out.loss.backward()
    return out.loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.slow
def test_switch_gradients_are_identical_with_checkpointing():
    loss, grads = gradients(False)
    loss_ckpt, grads_ckpt = gradients(True)
    assert loss == loss_ckpt
    assert all(torch.equal(grads[name], grads_ckpt[name]) for name in grads)


# One training step's peak RSS in a fresh process. glibc's mmap threshold is fixed low so that freed
# activations leave the RSS at once and the peak follows the live tensors. The peak (VmHWM) is reset once
# the model is built: what the imports touched must not hide the steps' peak.
CHILD = """
import json, sys, torch
from trainer.config import ModelConfig
from trainer.engine import apply_activation_checkpointing
from trainer.model import GPT
cfg, batch, seq, ckpt = json.loads(sys.argv[1])
torch.manual_seed(0)
model = GPT(ModelConfig(**cfg))
if ckpt:
    apply_activation_checkpointing(model)
idx = torch.randint(0, cfg["vocab_size"], (batch, seq))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
for _ in range(2):
    model.zero_grad(set_to_none=False)
    model(idx, idx).loss.backward()
print(json.dumps(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))))
"""


def peak_rss(checkpointing: bool) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([CFG, BATCH, SEQ, checkpointing])], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_checkpointing_saves_at_least_half_the_planned_activation_memory():
    from cluster.plan import activation_bytes

    cfg = ModelConfig(**CFG)
    planned = activation_bytes(cfg, BATCH, SEQ, "fp32", False) - activation_bytes(cfg, BATCH, SEQ, "fp32", True)
    measured = peak_rss(False) - peak_rss(True)
    assert measured >= 0.5 * planned, (measured / 2 ** 20, planned / 2 ** 20)
