"""ZeRO++ hierarchical partitioning (parallel.zero_hpz_partition_size): validated, passed to DeepSpeed, trained."""
from __future__ import annotations

import pytest
import yaml

from tests.trainer.conftest import REPO, free_port, make_run, read_metrics, run_training
from trainer.config import RunConfig
from trainer.engine import ds_config


def _config(shard_dir, zero_stage: int, hpz: int) -> dict:
    return {"model": yaml.safe_load((REPO / "configs/model/tiny-gpt.yaml").read_text()), "data": {"path": str(shard_dir)},
            "train": {"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 4},
            "parallel": {"zero_stage": zero_stage, "zero_hpz_partition_size": hpz}}


def test_hpz_needs_zero3_and_a_divisor_of_the_world(shard_dir):
    with pytest.raises(ValueError, match=r"parallel.zero_hpz_partition_size: 2 needs ZeRO-3"):
        RunConfig.model_validate(_config(shard_dir, 2, 2))
    with pytest.raises(Exception, match=r"parallel.zero_hpz_partition_size: 4 does not divide the 2"):
        RunConfig.model_validate(_config(shard_dir, 3, 4)).for_world(2)
    run = RunConfig.model_validate(_config(shard_dir, 3, 2)).for_world(2)
    assert ds_config(run, 2, 1)["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert "zero_hpz_partition_size" not in ds_config(RunConfig.model_validate(_config(shard_dir, 3, 1)), 2, 1)[
        "zero_optimization"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_with_hpz_trains_over_two_gloo_processes(tmp_path, shard_dir):
    run = make_run(tmp_path / "run", shard_dir, parallel={"zero_stage": 3, "zero_hpz_partition_size": 2},
                   train={"max_steps": 3, "micro_batch_size": 2})
    run_training(run, nproc=2, port=free_port())
    m = read_metrics(run)
    assert sorted(m) == [1, 2, 3] and m[3]["loss"] < m[1]["loss"]
