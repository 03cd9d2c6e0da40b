"""No rank holds the whole model: ZeRO-3 builds each rank's share only and saves only what each rank
owns; a sharded Switch checkpoint consolidates to exactly the live model. Two processes over gloo."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import REPO, child_env, free_port, make_run
from trainer import weight_shards
from trainer.config import ModelConfig
from trainer.data import CausalLM, heldout_batches, load_manifest
from trainer.eval import heldout_loss
from trainer.model import GPT
from trainer.model.counting import param_counts
from trainer.pretrained import load_pretrained

MIB = 2 ** 20


def run_worker(run, out, nproc=2):
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "tests.trainer.scale_worker", str(run), str(out)]
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]


# Building the whole model in one process: the RSS increase (peak) over the process before construction.
WHOLE = """
import json, resource, sys
from trainer.config import ModelConfig
from trainer.model import GPT
before = int(open("/proc/self/statm").read().split()[1]) * 4096
model = GPT(ModelConfig(**json.loads(sys.argv[1])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_builds_and_saves_each_ranks_share_only(tmp_path, shard_dir, repo_root):
    """GPT-3 Medium (354M parameters, 1.4 GB of fp32 weights) at ZeRO-3 on 2 processes."""
    import yaml

    model = yaml.safe_load((repo_root / "configs/model/gpt3-350m.yaml").read_text())
    run = make_run(tmp_path / "run", shard_dir, model="gpt3-350m", parallel={"zero_stage": 3},
                   train={"seq_len": 32, "micro_batch_size": 1, "global_batch_size": 2})
    fp32_weights = param_counts(ModelConfig(**model)).total * 4
    assert fp32_weights > 0.8e9
    ranks = run_worker(run, tmp_path / "out")
    whole = int(subprocess.run([sys.executable, "-c", WHOLE, json.dumps(model)], cwd=REPO, env=child_env(),
                               capture_output=True, text=True, check=True).stdout.split()[-1])
    assert whole >= fp32_weights
    for rank in ranks:
        assert rank["construction_increase"] < 0.6 * fp32_weights, rank
        # The rank's partitions are already in memory; saving them adds no more than a bounded buffer.
        assert rank["save_increase"] < 64 * MIB, rank
        # The free-space check before a first save asks for no more than the save then wrote.
        assert fp32_weights * 2 == rank["disk_lower_bound"] <= rank["disk_written"], rank


@pytest.mark.slow
@pytest.mark.multiproc
def test_consolidated_switch_checkpoint_is_exactly_the_live_model(tmp_path, shard_dir):
    """ZeRO-2 with the experts split over 2 expert-parallel ranks."""
    run = make_run(tmp_path / "run", shard_dir, model="tiny-switch", parallel={"zero_stage": 2, "ep_size": 2},
                   train={"micro_batch_size": 4, "global_batch_size": 8})
    run_worker(run, tmp_path / "out")
    live = [torch.load(tmp_path / "out" / f"live-rank-{r}.pt", weights_only=True) for r in (0, 1)]
    step = run / "checkpoints" / "step-1"
    consolidated = load_file(weight_shards.consolidate(step, tmp_path / "model.safetensors"))
    assert consolidated.keys() == live[0]["params"].keys()
    for name, tensor in consolidated.items():
        parts = sorted(((rank["offsets"][name], rank["params"][name]) for rank in live), key=lambda part: part[0])
        if parts[0][0] == parts[1][0]:  # replicated: both ranks hold the same dense weight
            assert torch.equal(parts[0][1], parts[1][1])
            expected = parts[0][1]
        else:  # this rank's experts start where the other's end
            expected = torch.cat([p for _, p in parts])
        assert torch.equal(tensor.view(expected.shape), expected), name
    # Eval reads the sharded checkpoint through the same consolidation: the live model's loss exactly.
    model, cfg, _ = load_pretrained(step)
    live_model = GPT(cfg.model).eval()
    live_model.load_state_dict(consolidated, strict=False)  # the tied LM head is the token embedding
    batches = heldout_batches(load_manifest(shard_dir, 50257), CausalLM(64), 4, 2.0, max_batches=4)
    assert heldout_loss(model, batches, CausalLM(64)) == heldout_loss(live_model, batches, CausalLM(64))
