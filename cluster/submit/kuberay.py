"""Kubernetes: a KubeRay `RayJob` that brings up a Ray cluster (a head and a worker group of
`nodes` pods with `gpus_per_node` GPUs each), runs the same entrypoint as `--backend ray`, and
tears the cluster down when the job finishes. The resolved config travels in the runtime env,
so nothing on the submitting machine has to be reachable from the pods."""
from __future__ import annotations

import re
import subprocess

import yaml

from cluster.errors import ClusterError
from cluster.submit import Job
from cluster.submit.ray_jobs import CONFIG_ENV, entrypoint

# A Kubernetes object name: lowercase RFC 1123 label.
_NAME_OK = re.compile(r"[^a-z0-9-]+")


def k8s_name(name: str) -> str:
    cleaned = _NAME_OK.sub("-", name.lower()).strip("-")[:63].strip("-")
    if not cleaned:
        raise ClusterError(f"job name {name!r} has no characters usable in a Kubernetes name")
    return cleaned


def _ray_version(image: str) -> str:
    match = re.search(r":(\d+\.\d+\.\d+)", image)
    if match:
        return match.group(1)
    import ray

    return ray.__version__


def _container(job: Job, name: str, gpus: int) -> dict:
    c = job.cluster
    limits = {"cpu": str(c.cpus_per_node), "memory": f"{c.memory_per_node_gb}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name,
        "image": c.image,
        "resources": {"limits": limits, "requests": dict(limits)},
        # The wandb key comes from a Kubernetes secret if one exists, never from the manifest.
        "env": [{"name": "WANDB_API_KEY",
                 "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}}],
    }


def manifest(job: Job) -> dict:
    c = job.cluster
    head_params = {
        # The KubeRay operator and the job submitter reach the dashboard from other pods,
        # so inside the pod it listens on all interfaces (the pod network, not the host's).
        "dashboard-host": "0.0.0.0",
        # No CPUs on the head: launcher actors and pipeline tasks belong on the workers.
        "num-cpus": "0",
    }
    workers = {
        "groupName": "gpu-workers" if c.gpus_per_node else "cpu-workers",
        "replicas": c.nodes,
        "minReplicas": c.nodes,
        "maxReplicas": c.nodes,
        "rayStartParams": {},
        "template": {"spec": {"containers": [_container(job, "ray-worker", c.gpus_per_node)]}},
    }
    head = _container(job, "ray-head", 0)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": k8s_name(job.name), "namespace": c.namespace},
        "spec": {
            "entrypoint": entrypoint(job),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {CONFIG_ENV: job.resolved_yaml}}, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": {
                "rayVersion": _ray_version(c.image),
                "headGroupSpec": {"rayStartParams": head_params, "template": {"spec": {"containers": [head]}}},
                "workerGroupSpecs": [workers],
            },
        },
    }


def render(job: Job) -> str:
    return yaml.safe_dump(manifest(job), sort_keys=False)


def apply(job: Job) -> str:
    """`kubectl apply` the manifest (from stdin, so no file is left behind); returns kubectl's line."""
    try:
        out = subprocess.run(["kubectl", "apply", "-f", "-"], input=render(job), capture_output=True,
                             text=True, check=False)
    except FileNotFoundError:
        raise ClusterError("kubectl not found: install it, or use --dry-run to print the RayJob manifest")
    if out.returncode != 0:
        raise ClusterError(f"kubectl apply failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip()
