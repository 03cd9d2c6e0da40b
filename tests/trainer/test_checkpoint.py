import json
import signal
import subprocess
import time

import torch

from tests.trainer.conftest import REPO, child_env, launch_cmd, make_run, read_metrics, run_training
from trainer import checkpoint


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
    run = make_run(tmp_path / "run", shard_dir, train={"max_steps": 6, "step_delay_s": 0.2})
    proc = subprocess.Popen(launch_cmd(run, 1, 0), env=child_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
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
