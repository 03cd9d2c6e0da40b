"""Against a real Ray head started by the fixture: a data job and a 2-worker CPU training job
submitted with `pretrain submit --backend ray`, followed to SUCCEEDED, their logs fetched with
`pretrain jobs`, and a stopped job reported as STOPPED with no process left behind."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from cluster.cli import main
from tests.cluster.conftest import trainer_ranks, wait_for_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_data_job_succeeds_and_writes_shards(data_job, capsys, ray_head):
    assert data_job.state == "SUCCEEDED", data_job.printed[-3000:]
    manifest = json.loads((data_job.output_dir / "manifest.json").read_text())
    assert {s["source"] for s in manifest["shards"]} == {"books", "wiki"}
    report = json.loads((data_job.output_dir / "report.json").read_text())
    assert report["sources"]["wiki"]["steps"]["read"]["removed"]  # redirects are counted, not silently lost
    assert main(["jobs", "logs", data_job.job_id, "--address", ray_head]) == 0
    assert "manifest.json" in capsys.readouterr().out


def test_training_job_runs_two_ranks_to_success(train_job, capsys, ray_head):
    assert train_job.state == "SUCCEEDED", train_job.printed[-3000:]
    assert "launching 2 node(s) x 1 rank(s)" in train_job.printed
    steps = [json.loads(line)["step"] for line in (train_job.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
    config = yaml.safe_load((train_job.output_dir / "config.yaml").read_text())
    assert config["parallel"]["ep_size"] == 2 and config["cluster"]["nodes"] == 2
    assert main(["jobs", "status", train_job.job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith(f"{train_job.job_id}: SUCCEEDED")
    assert main(["jobs", "list", "--address", ray_head]) == 0
    listing = capsys.readouterr().out
    assert train_job.job_id in listing and "SUCCEEDED" in listing


def test_stopped_job_is_reported_stopped_and_leaves_no_ranks(data_job, ray_head, capsys, tmp_path, repo_root):
    run_dir = tmp_path / "long-run"
    assert main(["submit", str(repo_root / "configs/train/tiny-switch-cpu.yaml"), "--backend", "ray",
                 "--address", ray_head, "--run-dir", str(run_dir), "--name", "pretrain-test-stop",
                 "--nodes", "2", "--gpus-per-node", "0", "--set", f"data.path={data_job.output_dir}",
                 "--set", "train.max_steps=100000", "--set", "logging.wandb_mode=disabled"]) == 0
    capsys.readouterr()
    wait_for_ranks(str(run_dir), count=2)
    assert main(["jobs", "stop", "pretrain-test-stop", "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == "pretrain-test-stop: STOPPED"
    deadline = time.monotonic() + 30
    while trainer_ranks(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not trainer_ranks(str(run_dir)), "trainer ranks survived the stopped job"


def test_unknown_job_is_a_one_line_error(ray_head, capsys):
    assert main(["jobs", "status", "no-such-job", "--address", ray_head]) == 2
    assert capsys.readouterr().err.count("\n") == 1
