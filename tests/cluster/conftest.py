"""Cluster fixtures: a real Ray head on 127.0.0.1 (its own ports and temp dir, so other Ray
instances on the machine are untouched, and stopped by killing only its own processes), and the
jobs the slow tests share: a data-pipeline job and a 2-worker tiny Switch training job on its shards."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cluster.cli import main

VENV_BIN = Path(sys.executable).parent


def plan_json(capsys, *args: str) -> tuple[int, dict]:
    """`pretrain plan ARGS --json`: (exit code, the plan)."""
    code = main(["plan", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def own_processes(marker: str) -> list[psutil.Process]:
    """Processes of our Ray instance: every one of them carries our temp dir on its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_ray(temp_dir: str) -> None:
    procs = own_processes(temp_dir)
    # Ray's agents rename themselves (ray::DashboardAgent, ...), so the temp dir is no longer on
    # their command line: take every descendant too, or they linger for minutes using CPU.
    for p in list(procs):
        try:
            procs.extend(c for c in p.children(recursive=True) if c not in procs)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def ray_head_dir() -> str:
    """The fixture head's --temp-dir: its processes carry it on their command lines (own_processes)."""
    return tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths have a length limit


@pytest.fixture(scope="session")
def ray_head(ray_head_dir):
    """`ray start --head` with the dashboard, all on 127.0.0.1; yields the dashboard address."""
    temp_dir = ray_head_dir
    gcs, dash, client, node_mgr, obj_mgr, metrics, agent, agent_grpc, env_agent = free_ports(9)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        stop_ray(temp_dir)
        pytest.fail(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address)
        yield address
    finally:
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def trainer_ranks(run_dir: str) -> list[psutil.Process]:
    """The training ranks of one run dir, wherever they were started from."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "trainer.main" in cmd and run_dir in cmd:
            found.append(proc)
    return found


def wait_for_ranks(run_dir: str, count: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while len(trainer_ranks(run_dir)) < count:
        assert time.monotonic() < deadline, f"{count} trainer ranks never started for {run_dir}"
        time.sleep(0.5)


def _wait_for_jobs_api(address: str, timeout_s: float = 60) -> None:
    from cluster.submit.ray_jobs import list_jobs

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_jobs(address)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@dataclass
class SubmittedJob:
    job_id: str
    output_dir: Path
    state: str  # the final status `pretrain submit --follow` printed
    printed: str  # everything it printed: the job's logs, then the status line


def submit_and_follow(address: str, config: Path, out: Path, name: str, *extra: str) -> SubmittedJob:
    """`pretrain submit --backend ray --follow` in-process; stdout captured here because session
    fixtures cannot use capsys."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["submit", str(config), "--backend", "ray", "--address", address, "--run-dir", str(out),
                     "--name", name, "--follow", *extra])
    printed = buffer.getvalue()
    state = printed.strip().splitlines()[-1].rsplit(" ", 1)[-1] if printed.strip() else f"exit {code}"
    assert (code == 0) == (state == "SUCCEEDED"), printed[-3000:]
    return SubmittedJob(name, out, state, printed)


@pytest.fixture(scope="session")
def data_config(tmp_path_factory, shared_data) -> Path:
    """Two books and the Wikipedia sample: every stage of the pipeline, a few seconds of work."""
    path = tmp_path_factory.mktemp("data-config") / "data.yaml"
    path.write_text(f"""\
sources:
  - name: books
    weight: 0.7
    format: books
    inputs: [{shared_data}/books/austen_p*.txt]
  - name: wiki
    weight: 0.3
    format: wiki
    inputs: [{shared_data}/wiki/*.bz2]
tokenizer:
  path: {shared_data}/tokenizer/gpt2/r50k_base.tiktoken
shards:
  target_bytes: 1000000
""")
    return path


@pytest.fixture(scope="session")
def data_job(ray_head, data_config, tmp_path_factory) -> SubmittedJob:
    out = tmp_path_factory.mktemp("data-job") / "shards"
    return submit_and_follow(ray_head, data_config, out, "pretrain-test-data")


@pytest.fixture(scope="session")
def train_job(ray_head, data_job, repo_root, tmp_path_factory) -> SubmittedJob:
    """tiny Switch on 2 CPU workers (two launcher actors, one rank each, experts split over both)."""
    assert data_job.state == "SUCCEEDED", data_job.printed[-3000:]
    run_dir = tmp_path_factory.mktemp("train-job") / "run"
    return submit_and_follow(ray_head, repo_root / "configs/train/tiny-switch-cpu.yaml", run_dir,
                             "pretrain-test-train", "--nodes", "2", "--gpus-per-node", "0",
                             "--set", f"data.path={data_job.output_dir}", "--set", "train.max_steps=4",
                             "--set", "parallel.ep_size=2", "--set", "logging.wandb_mode=disabled")
