"""Ray: submit a job through the Ray Jobs API. The entrypoint is `cluster.submit.ray_launcher`,
and the runtime env carries the resolved config as text, so the cluster needs the `pretrain`
package installed but no file from the submitting machine."""
from __future__ import annotations

import shlex

from cluster.jobs import client, is_local
from cluster.submit import Job

# The runtime-env variable that holds the resolved YAML (configs are a few KB; no secrets in them).
CONFIG_ENV = "PRETRAIN_CONFIG_YAML"


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
