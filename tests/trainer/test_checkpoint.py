import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.trainer.conftest import (REPO, child_env, free_port, launch_cmd, make_run, read_metrics, run_training,
                                    train_in_process)
from trainer import checkpoint, testing_hooks
from trainer.config import ModelConfig, MoEConfig
from trainer.errors import TrainError


def test_latest_points_at_a_complete_checkpoint_and_old_ones_are_pruned(dense_run):
    root = dense_run / "checkpoints"
    assert (root / "latest").read_text() == "step-30"
    assert [p.name for _, p in checkpoint.step_dirs(root)] == ["step-30"]  # keep_last 1
    step = root / "step-30"
    assert json.loads((step / "COMPLETE").read_text())["step"] == 30
    state = json.loads((step / "trainer-rank0.json").read_text())
    assert state["step"] == 30 and state["data"]["slots"] and state["rng"]["torch"]


def test_half_written_checkpoint_is_skipped_with_a_warning(dense_run, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    (root / "step-30").mkdir(parents=True)
    (root / "step-30" / checkpoint.COMPLETE).write_text("{}")
    (root / "step-40").mkdir()
    (root / "step-40" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert checkpoint.newest_valid(root) == root / "step-30"
    assert "skipping checkpoint" in caplog.text and "step-40" in caplog.text


def test_consolidation_concatenates_expert_shards(tmp_path):
    step = tmp_path / "step-1"
    step.mkdir()
    (step / checkpoint.COMPLETE).write_text("{}")
    dense = torch.ones(3)
    for ep in (0, 1):
        torch.save({"transformer.h.1.mlp.w_fc": torch.full((2, 4, 8), float(ep)), "lm_head.weight": dense},
                   step / f"model-ep{ep}.pt")
    merged = checkpoint.consolidate(step)
    assert merged["transformer.h.1.mlp.w_fc"].shape == (4, 4, 8)
    assert merged["transformer.h.1.mlp.w_fc"][2:].eq(1).all() and torch.equal(merged["lm_head.weight"], dense)


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


def test_old_switch_w_proj_layout_is_converted_for_eval_and_export(tmp_path):
    """Checkpoints from before 2026-11-27 hold Switch w_proj as [E, d_ff, d_model]; eval and export
    (checkpoint.fit_to_model) transpose it. Any other mismatch is refused with the key named."""
    from trainer.model import GPT

    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=100, n_ctx=32, moe=MoEConfig(num_experts=4)))
    state = model.state_dict()
    old = {k: v.transpose(1, 2).clone() if k.endswith(".w_proj") else v for k, v in state.items()}
    assert old["transformer.h.1.mlp.w_proj"].shape == (4, 64, 16)
    fitted = checkpoint.fit_to_model(model, old, tmp_path)
    assert all(torch.equal(fitted[k], v) for k, v in state.items())
    bad = {**state, "transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 16)}
    del bad["transformer.ln_f.bias"]
    with pytest.raises(TrainError, match=r"c_fc.weight has shape \[32, 16\], this model \[64, 16\]") as err:
        checkpoint.fit_to_model(model, bad, tmp_path)
    assert "transformer.ln_f.bias missing" in str(err.value)
    # Checkpoints also held non-persistent buffers (a sinusoidal table the model rebuilds): ignored.
    sinusoidal = GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=100, n_ctx=32, pos_embedding="sinusoidal"))
    saved = {**sinusoidal.state_dict(), "pos_table": sinusoidal.pos_table.clone()}
    sinusoidal.load_state_dict(checkpoint.fit_to_model(sinusoidal, saved, tmp_path), strict=True)


def test_resume_refuses_weights_that_do_not_fit_the_model(dense_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    step = checkpoint.newest_valid(run / "checkpoints")
    weights = torch.load(step / "model-ep0.pt", weights_only=True)
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"][:-1].clone()
    torch.save(weights, step / "model-ep0.pt")
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
