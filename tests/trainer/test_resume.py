"""Exact resume (DESIGN.md reliability rules): N steps straight == k steps, kill -9, resume to N,
in per-step losses and in the batches every rank consumed; also when killed mid-checkpoint.
Tiny Switch, 2 processes, expert parallelism 2, ZeRO-2: the hardest case for restoring state."""
import json
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from tests.trainer.conftest import REPO, child_env, free_port, launch_cmd, make_run, read_metrics, run_training
from trainer import testing_hooks

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STEPS = 20
TRAIN = {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "seq_len": 32}


def new_run(path, shard_dir, **checkpoint):
    return make_run(path, shard_dir, model="tiny-switch", train=dict(TRAIN), parallel={"zero_stage": 2, "ep_size": 2},
                    checkpoint={"interval": 10, **checkpoint}, logging={"wandb_mode": "disabled", "sample_log": True})


def set_config(run, section, **values):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg[section].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_until_killed(run, condition, hook_env, timeout=180):
    """Start training with the testing hooks in `hook_env`, SIGKILL the launcher and both ranks as soon as
    `condition()` holds."""
    proc = subprocess.Popen(launch_cmd(run, 2, free_port()), env={**child_env(), **hook_env}, cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not condition():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "timed out waiting for the kill point"
            time.sleep(0.05)
    finally:
        # torchrun starts its workers in their own sessions: kill the launcher's whole tree by pid.
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.send_signal(signal.SIGKILL)
        proc.wait()


def samples(run) -> dict:
    """(rank, step) -> batch hash; a step consumed again after a resume keeps its last hash."""
    out = {}
    for rank in (0, 1):
        for line in (run / "samples" / f"rank-{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[rank, r["step"]] = r["sha1"]
    return out


def assert_same_run(a, b, steps=STEPS):
    ma, mb = read_metrics(a), read_metrics(b)
    assert sorted(mb) == list(range(1, steps + 1))
    assert [ma[s]["loss"] for s in ma] == [mb[s]["loss"] for s in ma]  # exact, fp32
    assert [ma[s].get("expert_load") for s in ma] == [mb[s].get("expert_load") for s in ma]
    assert samples(a) == samples(b) and len(samples(a)) == 2 * steps


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shard_dir):
    run = new_run(tmp_path_factory.mktemp("straight") / "run", shard_dir)
    run_training(run, nproc=2, port=free_port())
    return run


@pytest.fixture(scope="module")
def killed_after_checkpoint(tmp_path_factory, shard_dir):
    run = new_run(tmp_path_factory.mktemp("killed") / "run", shard_dir)
    latest = run / "checkpoints" / "latest"
    # The step delay makes the kill land between step 10 and 20.
    run_until_killed(run, lambda: latest.is_file() and latest.read_text() == "step-10",
                     {testing_hooks.STEP_DELAY_S: "0.2"})
    return run


def test_kill_9_and_resume_gives_identical_losses_and_samples(straight, killed_after_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed_after_checkpoint, run)
    assert max(read_metrics(run)) < STEPS
    run_training(run, nproc=2, port=free_port())
    assert_same_run(straight, run)


def test_kill_during_checkpoint_writing_resumes_from_the_last_complete_one(straight, killed_after_checkpoint,
                                                                           tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed_after_checkpoint, run)
    set_config(run, "checkpoint", interval=5)
    half = run / "checkpoints" / "step-15"
    run_until_killed(run, lambda: (half / "trainer-rank1.json").is_file() and (half / "weights-rank1.safetensors").is_file(),
                     {testing_hooks.PAUSE_BEFORE_COMMIT_S: "60"})
    assert not (half / "COMPLETE").exists() and (run / "checkpoints" / "latest").read_text() == "step-10"
    proc = run_training(run, nproc=2, port=free_port())
    assert "skipping checkpoint" in proc.stderr and "step-15" in proc.stderr
    assert_same_run(straight, run)


@pytest.mark.parametrize("model,parallel", [("tiny-t5", {"zero_stage": 2}),
                                            ("tiny-switch-t5", {"zero_stage": 2, "ep_size": 2})])
def test_encoder_decoder_kill_9_and_resume(model, parallel, tmp_path, shard_dir):
    """T5 span corruption on the same engine: 6 steps straight == killed after the step-3 checkpoint and
    resumed, in losses, expert loads and the batches each rank consumed."""
    def run(name):
        return make_run(tmp_path / name, shard_dir, model=model, parallel=parallel, checkpoint={"interval": 3},
                        train={"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "seq_len": 32,
                               "objective": "span_corruption"},
                        logging={"wandb_mode": "disabled", "sample_log": True})

    straight, killed = run("straight"), run("killed")
    run_training(straight, nproc=2, port=free_port())
    latest = killed / "checkpoints" / "latest"
    run_until_killed(killed, lambda: latest.is_file() and latest.read_text() == "step-3",
                     {testing_hooks.STEP_DELAY_S: "0.5"})
    assert max(read_metrics(killed)) < 6
    run_training(killed, nproc=2, port=free_port())
    assert_same_run(straight, killed, steps=6)
    assert read_metrics(straight)[6]["loss"] < read_metrics(straight)[1]["loss"]
