"""The Ray backend, through a Ray cluster's Jobs API (its dashboard): `pretrain submit --backend ray`
submits a job whose entrypoint is `cluster.submit.ray_launcher` and whose runtime env carries the
resolved config as text, so the cluster needs the `pretrain` package installed but no file from the
submitting machine; `pretrain jobs` lists, inspects, follows and stops jobs."""
from __future__ import annotations

import os
import shlex
import sys
import time
from urllib.parse import urlparse

from cluster.errors import ClusterError
from cluster.submit import Job
from data_pipeline.executors import use_ray_token_rule

# The runtime-env variable that holds the resolved YAML (configs are a few KB; no secrets in them).
CONFIG_ENV = "PRETRAIN_CONFIG_YAML"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS, else the local dashboard; a bare host:port means http."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address


def is_local(address: str | None) -> bool:
    return urlparse(resolve_address(address)).hostname in {"127.0.0.1", "localhost", "::1"}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    use_ray_token_rule()
    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot reach the Ray Jobs API at {url}: {str(e).splitlines()[0]} "
                           "(start a cluster with `ray start --head`, or pass --address)") from None


def _call(fn, *args):
    """Jobs API calls raise RuntimeError for unknown ids and HTTP failures: one line for the user."""
    try:
        return fn(*args)
    except RuntimeError as e:
        raise ClusterError(str(e).splitlines()[0]) from None


def entrypoint(job: Job, same_machine: bool = False) -> str:
    """The job's shell command; on a cluster on this machine it uses this interpreter, else the image's."""
    c = job.cluster
    args = [job.python(shared_filesystem=same_machine), "-m", "cluster.submit.ray_launcher", job.kind,
            "--out", job.output_dir, "--nodes", str(c.nodes), "--gpus-per-node", str(c.gpus_per_node)]
    return shlex.join(args)


def runtime_env(job: Job) -> dict:
    return {"env_vars": {CONFIG_ENV: job.resolved_yaml}}


def submit(job: Job, address: str | None) -> str:
    """Submits and returns the submission id."""
    return client(address).submit_job(
        entrypoint=entrypoint(job, same_machine=is_local(address)),
        runtime_env=runtime_env(job),
        submission_id=job.name,
        metadata={"kind": job.kind, "config": str(job.config_path), "output_dir": job.output_dir},
    )


def status(address: str | None, job_id: str) -> str:
    return str(_call(client(address).get_job_status, job_id).value)


def info(address: str | None, job_id: str):
    return _call(client(address).get_job_info, job_id)


def list_jobs(address: str | None) -> list:
    jobs = _call(client(address).list_jobs)
    return sorted(jobs, key=lambda j: j.start_time or 0)


def logs(address: str | None, job_id: str) -> str:
    return _call(client(address).get_job_logs, job_id)


def stop(address: str | None, job_id: str, wait_s: float = 0.0) -> str:
    c = client(address)
    _call(c.stop_job, job_id)
    return wait(address, job_id, wait_s) if wait_s else status(address, job_id)


def wait(address: str | None, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Polls until the job is terminal (or the timeout passes); returns the last status."""
    c = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = str(_call(c.get_job_status, job_id).value)
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


def follow(address: str | None, job_id: str, out=None) -> str:
    """Streams the job's logs (to stdout by default) until it ends; returns its final status."""
    import asyncio

    out = out or sys.stdout
    c = client(address)
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError:  # a busy dashboard can drop the stream (close code 1006): poll to the end instead
        state = wait(address, job_id)
        out.write(logs(address, job_id)[written:])
        out.flush()
        return state
    # The log stream closes when the job ends; the status may lag it by a moment.
    return wait(address, job_id, timeout_s=30)
