import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.trainer.conftest import (REPO, child_env, free_port, launch_cmd, make_run, read_metrics, run_training,
                                    train_in_process)
from trainer import checkpoint, testing_hooks, weight_shards
from trainer.errors import TrainError
from trainer.tensorfile import SafetensorsWriter


def test_latest_points_at_a_complete_checkpoint_and_old_ones_are_pruned(dense_run):
    root = dense_run / "checkpoints"
    assert (root / "latest").read_text() == "step-30"
    assert [p.name for _, p in checkpoint.step_dirs(root)] == ["step-30"]  # keep_last 1
    step = root / "step-30"
    complete = json.loads((step / "COMPLETE").read_text())
    assert complete["step"] == 30 and (complete["world_size"], complete["zero_stage"], complete["ep_size"]) == (1, 0, 1)
    state = json.loads((step / "trainer-rank0.json").read_text())
    assert state["step"] == 30 and sum(state["data"]["windows"].values()) == 30 * 4  # 30 steps of 4 sequences


def test_half_written_checkpoint_is_skipped_with_a_warning(dense_run, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    (root / "step-30").mkdir(parents=True)
    (root / "step-30" / checkpoint.COMPLETE).write_text("{}")
    (root / "step-40").mkdir()
    (root / "step-40" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert checkpoint.newest_valid(root) == root / "step-30"
    assert "skipping checkpoint" in caplog.text and "step-40" in caplog.text


def test_a_save_the_disk_cannot_hold_is_refused_before_anything_is_written(dense_run, tmp_path):
    from trainer.distributed import init_distributed, shutdown_distributed

    root = dense_run / "checkpoints"
    need = checkpoint.required_bytes(None, root, 1)  # after the first save: the newest checkpoint's size
    assert need == sum(f.stat().st_size for f in (root / "step-30").rglob("*") if f.is_file()) > 0
    saved = dict(os.environ)
    init_distributed()  # the check agrees across ranks: a world of one here
    try:
        checkpoint.check_free_space(tmp_path / "ckpt", "step-45", need)
        too_much = shutil.disk_usage(tmp_path).free + 10 ** 15
        with pytest.raises(TrainError, match=r"not enough disk space under .*ckpt to save step-45: it needs about"):
            checkpoint.check_free_space(tmp_path / "ckpt", "step-45", too_much)
    finally:
        shutdown_distributed()
        os.environ.clear()
        os.environ.update(saved)
    assert list((tmp_path / "ckpt").iterdir()) == []


def write_fragments(step, rank: int, fragments: dict[str, tuple[int, torch.Tensor, tuple]]) -> None:
    """A weights-rank file as a rank writes it: name -> (flat start in the whole tensor, values, whole shape)."""
    meta = {name: {"start": start, "shape": list(shape)} for name, (start, _, shape) in fragments.items()}
    specs = [(name, (t.numel(),), torch.float32) for name, (_, t, _) in fragments.items()]
    with SafetensorsWriter(step / weight_shards.file_name(rank), specs, {"fragments": json.dumps(meta)}) as w:
        for name, (_, t, _) in fragments.items():
            w.write(name, t)


def test_consolidation_joins_every_ranks_fragments(tmp_path):
    """Rank 0 holds expert shard 0 and the first half of a ZeRO-partitioned dense weight, rank 1 the rest."""
    step = tmp_path / "step-1"
    step.mkdir()
    experts, dense = torch.arange(64.0).view(4, 2, 8), torch.randn(3, 5)
    write_fragments(step, 0, {"e": (0, experts[:2].flatten(), (4, 2, 8)), "d": (0, dense.flatten()[:8], (3, 5))})
    write_fragments(step, 1, {"e": (32, experts[2:].flatten(), (4, 2, 8)), "d": (8, dense.flatten()[8:], (3, 5))})
    out = weight_shards.consolidate(step, tmp_path / "model.safetensors")
    merged = load_file(out)
    assert torch.equal(merged["e"], experts) and torch.equal(merged["d"], dense)
    (step / weight_shards.file_name(1)).unlink()
    with pytest.raises(TrainError, match=r"hold 32 of the 64 elements \[0, 64\) of e"):
        weight_shards.consolidate(step, tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, shard_dir):
    run = make_run(tmp_path / "run", shard_dir, train={"max_steps": 6})
    env = {**child_env(), testing_hooks.STEP_DELAY_S: "0.2"}
    proc = subprocess.Popen(launch_cmd(run, 1, 0), env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM" in err
    stopped_at = max(read_metrics(run))
    assert stopped_at < 6 and (run / "checkpoints" / "latest").read_text() == f"step-{stopped_at}"
    result = run_training(run)
    assert f"resumed from" in result.stderr and max(read_metrics(run)) == 6


def test_resume_refuses_weights_that_do_not_fit_the_model(dense_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    step = checkpoint.newest_valid(run / "checkpoints")
    weights = weight_shards.ShardedWeights(step)
    tensors = dict(weights.tensors())
    tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"][:-1].clone()
    write_fragments(step, 0, {name: (0, t.flatten(), tuple(t.shape)) for name, t in tensors.items()})
    with pytest.raises(TrainError, match=r"step-30 does not fit this run's model: transformer.h.0.mlp.c_fc.weight "
                                         r"has shape \[\d+, \d+\]"):
        train_in_process(run)


@pytest.mark.slow
@pytest.mark.multiproc
def test_multiprocess_user_error_exits_2_without_a_launcher_traceback(dense_run, tmp_path):
    """trainer.launch's torchrun (what `pretrain train --nproc N` runs): ranks print the error, the launcher adds
    no traceback of its own and exits 2. Here: a 1-process run (global batch = micro batch) resumed by 2 processes."""
    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    cmd = [sys.executable, "-m", "trainer.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "trainer.main", str(run)]
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error: train.global_batch_size: 4 != train.micro_batch_size (4)") == 2  # each rank
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_resume_in_another_layout_is_refused_naming_both(dense_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["parallel"]["zero_stage"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(TrainError, match=r"step-30 was written by 1 processes at ZeRO-0, ep_size 1; this run has "
                                         r"1 processes at ZeRO-2, ep_size 1"):
        train_in_process(run)


def test_consolidate_command_writes_the_whole_model(dense_run, tmp_path, capsys):
    from cluster.cli import main

    out = tmp_path / "model.safetensors"
    assert main(["checkpoint", "consolidate", str(dense_run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = load_file(out)
    expected = dict(weight_shards.ShardedWeights(checkpoint.resolve(dense_run)).tensors())
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert main(["checkpoint", "consolidate", str(tmp_path / "nothing"), "--out", str(out)]) == 2
