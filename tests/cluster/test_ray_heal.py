"""Ray jobs that heal, on the real Ray head of the fixtures: a training job whose rank is killed with
-9 restarts its ranks, resumes from the newest complete checkpoint and ends SUCCEEDED with the same
losses, step for step, as the uninterrupted `train_job`; a data job whose Ray worker is killed ends
SUCCEEDED with the same manifest, byte for byte, as the uninterrupted `data_job`."""
from __future__ import annotations

import time

import psutil
import pytest

from cluster.cli import build_parser, main
from cluster.submit import ray_jobs
from cluster.submit.build import build_job
from tests.cluster.conftest import own_processes, trainer_ranks
from tests.trainer.conftest import read_metrics
from trainer import testing_hooks

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def submit_with_env(address: str, argv: list[str], env: dict[str, str]) -> str:
    """`pretrain submit` with test hooks in the job's environment (they reach its actors and ranks)."""
    job = build_job(build_parser().parse_args(["submit", *argv, "--backend", "ray", "--address", address]))
    env_vars = {**ray_jobs.runtime_env(job)["env_vars"], **env}
    return ray_jobs.client(address).submit_job(entrypoint=ray_jobs.entrypoint(job, same_machine=True),
                                               runtime_env={"env_vars": env_vars}, submission_id=job.name)


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def test_training_job_restarts_a_killed_rank_and_matches_the_uninterrupted_run(train_job, data_job, ray_head,
                                                                              repo_root, tmp_path):
    """train_job's settings plus a checkpoint every 2 steps; rank 1 is killed after the step-2 checkpoint."""
    assert train_job.state == "SUCCEEDED", train_job.printed[-3000:]
    straight = read_metrics(train_job.output_dir)
    run_dir = tmp_path / "run"
    job_id = submit_with_env(ray_head, [
        str(repo_root / "configs/train/tiny-switch-cpu.yaml"), "--run-dir", str(run_dir), "--name", "pretrain-test-heal",
        "--nodes", "2", "--gpus-per-node", "0", "--set", f"data.path={data_job.output_dir}",
        "--set", "train.max_steps=4", "--set", "parallel.ep_size=2", "--set", "logging.wandb_mode=disabled",
        "--set", "checkpoint.interval=2"], {testing_hooks.STEP_DELAY_S: "1.0"})
    latest = run_dir / "checkpoints" / "latest"
    wait_until(lambda: latest.is_file() and latest.read_text() == "step-2", 240, "the step-2 checkpoint")
    rank1 = [p for p in trainer_ranks(str(run_dir)) if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1 and max(read_metrics(run_dir)) < 4, "the job was not mid-way"
    rank1[0].kill()
    assert ray_jobs.wait(ray_head, job_id, timeout_s=300) == "SUCCEEDED", ray_jobs.logs(ray_head, job_id)[-3000:]
    assert "restart 1 of 3 (cluster.max_restarts)" in ray_jobs.logs(ray_head, job_id)
    healed = read_metrics(run_dir)
    assert sorted(healed) == sorted(straight) == [1, 2, 3, 4]
    assert [healed[s]["loss"] for s in straight] == [straight[s]["loss"] for s in straight]  # exact, fp32
    assert [healed[s]["expert_load"] for s in straight] == [straight[s]["expert_load"] for s in straight]


def test_data_job_survives_a_killed_ray_worker(data_job, data_config, ray_head, ray_head_dir, tmp_path):
    out = tmp_path / "shards"
    assert main(["submit", str(data_config), "--backend", "ray", "--address", ray_head, "--run-dir", str(out),
                 "--name", "pretrain-test-data-heal"]) == 0
    killed = []

    def kill_a_worker_mid_task() -> bool:
        for head_process in own_processes(ray_head_dir):
            for worker in head_process.children(recursive=True):
                try:
                    # Ray titles a worker by the task it runs.
                    if " ".join(worker.cmdline()).startswith("ray::process_input"):
                        worker.kill()
                        killed.append(worker.pid)
                        return True
                except psutil.NoSuchProcess:
                    continue
        return False

    wait_until(kill_a_worker_mid_task, 120, "a Ray worker running the pipeline", poll_s=0.02)
    assert ray_jobs.wait(ray_head, "pretrain-test-data-heal", timeout_s=300) == "SUCCEEDED"
    assert (out / "manifest.json").read_bytes() == (data_job.output_dir / "manifest.json").read_bytes()
