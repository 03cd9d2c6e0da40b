"""kill -9 in the middle of `pretrain data run`, rerun: the same manifest and shard bytes as
an uninterrupted run, with in-process Ray and with a `ray start --head` cluster."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import kill_ray_started_since, ray_processes

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, shared_data) -> Path:
    """Books and the crawl: several inputs, so there is time to kill the run between them."""
    config = yaml.safe_load((REPO / "configs/data/sample.yaml").read_text())
    config["sources"] = [s for s in config["sources"] if s["name"] in ("web", "books")]
    for source in config["sources"]:
        source["inputs"] = [str(shared_data / p.removeprefix("../shared/data/")) for p in source["inputs"]]
    config["sources"][0]["filters"]["language"]["model_path"] = str(shared_data / "langid/lid.176.ftz")
    config["tokenizer"]["path"] = str(shared_data / "tokenizer/gpt2/r50k_base.tiktoken")
    path = tmp_path_factory.mktemp("rerun") / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def forget_cluster(port: int) -> None:
    """`ray start` records its address for later bare `ray.init()` calls on this machine; drop
    that record once the cluster is gone, but only if it is ours."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if record.is_file() and record.read_text().strip().endswith(f":{port}"):
        record.unlink()


# A token file in ~/.ray makes `ray start` require tokens that drivers then do not send.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def data_run(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **RAY_ENV}
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "data", "run", str(config), "--out", str(out), *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the process group, and any descendant that left it (Ray's agents may)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=60)


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    """A run killed with -9 cannot stop the local Ray it started, and some of Ray's processes
    (agents, the client proxy) leave its process group: stop the ones this test started."""
    before = set(ray_processes())
    yield
    kill_ray_started_since(before)


def run_and_kill(config: Path, out: Path, *extra: str) -> None:
    """Start a run and kill -9 it (and its process group) once the first input is done."""
    proc = data_run(config, out, *extra)
    deadline = time.time() + 240
    while not list((out / "_work/tasks").glob("0*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    kill_group(proc)


def finish(config: Path, out: Path, *extra: str) -> None:
    proc = data_run(config, out, *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


def shard_digests(out: Path) -> tuple[bytes, dict[str, bytes]]:
    return (out / "manifest.json").read_bytes(), {str(p.relative_to(out)): p.read_bytes() for p in out.glob("*/shard-*.tar")}


@pytest.fixture(scope="module")
def reference(config_path, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("reference")
    finish(config_path, out, "--local")
    return shard_digests(out)


def test_kill_and_rerun_with_in_process_ray(config_path, reference, tmp_path):
    run_and_kill(config_path, tmp_path)
    finish(config_path, tmp_path)
    assert shard_digests(tmp_path) == reference
    assert not list(tmp_path.glob("*/*.tmp"))


def test_kill_and_rerun_against_a_ray_cluster(config_path, reference, tmp_path):
    port = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
        env={**os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        run_and_kill(config_path, tmp_path, "--address", address)
        finish(config_path, tmp_path, "--address", address)
        assert shard_digests(tmp_path) == reference
    finally:
        kill_group(head)
        forget_cluster(port)
