"""Kubernetes: a KubeRay `RayJob` that brings up a Ray cluster (a head and a worker group of
`nodes` pods with `gpus_per_node` GPUs each), runs the same entrypoint as `--backend ray`, and
tears the cluster down when the job finishes.

Every pod mounts one shared volume (`cluster.k8s.volume`, a ReadWriteMany PVC), and every path
in the job is rewritten to where the pods see it: the run dir (so checkpoints and RUN/config.yaml)
and the data on the volume, this machine's paths through `cluster.k8s.path_map`. A path that
would not resolve inside the pods is refused here, naming its field. The resolved config travels
as text in the RayJob's runtime env; the entrypoint's prepare step writes it to RUN/config.yaml on
the volume before any rank starts, so the head and every worker read the same file."""
from __future__ import annotations

import dataclasses
import posixpath
import re
import subprocess

import yaml

from cluster.config import ClusterConfig, Toleration, is_under
from cluster.errors import ClusterError
from cluster.submit import Job
from cluster.submit.ray_jobs import CONFIG_ENV, entrypoint

# A Kubernetes object name: lowercase RFC 1123 label.
_NAME_OK = re.compile(r"[^a-z0-9-]+")
SHARED_VOLUME = "shared"


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


class PodPaths:
    """This machine's paths as the pods see them: under the volume's mount as they are, else through
    the longest matching `path_map` entry; anything else cannot be read in a pod and is an error."""

    def __init__(self, cluster: ClusterConfig):
        if cluster.k8s.volume is None:
            raise ClusterError("cluster.k8s.volume: backend k8s needs a shared volume (a ReadWriteMany "
                               "PersistentVolumeClaim) for the data, the run dir and its checkpoints: set "
                               "k8s.volume.claim (and k8s.volume.mount_path) in the cluster config")
        self.mount = cluster.k8s.volume.mount_path
        self.path_map = sorted(cluster.k8s.path_map.items(), key=lambda item: len(item[0]), reverse=True)

    def __call__(self, path: str, field: str) -> str:
        if posixpath.isabs(path):
            path = posixpath.normpath(path)
            if is_under(path, self.mount):
                return path
            for local, pod in self.path_map:
                if is_under(path, local):
                    return posixpath.normpath(posixpath.join(pod, posixpath.relpath(path, local)))
        raise ClusterError(f"{field}: {path} is not on the shared volume (cluster.k8s.volume.mount_path {self.mount}) "
                           "and no cluster.k8s.path_map entry maps it there, so the pods could not read it; put it "
                           "on the volume or map its directory")

    def output(self, path: str, field: str) -> str:
        """A relative run/output dir means a directory on the volume (the default: runs/NAME)."""
        return self(path if posixpath.isabs(path) else posixpath.join(self.mount, path), field)


def _train_config(text: str, to_pod: PodPaths) -> str:
    config = yaml.safe_load(text)
    config["data"]["path"] = to_pod(config["data"]["path"], "data.path")
    return yaml.safe_dump(config, sort_keys=False)


def _data_config(text: str, to_pod: PodPaths, output: str) -> str:
    """The pipeline's file fields (the ones data_pipeline.config.resolve_paths makes absolute) and its globs."""
    config = yaml.safe_load(text)
    config["output"] = output
    config["tokenizer"]["path"] = to_pod(config["tokenizer"]["path"], "tokenizer.path")
    decontamination = config.get("decontamination") or {}
    if decontamination.get("eval_sets"):
        decontamination["eval_sets"] = [to_pod(p, "decontamination.eval_sets") for p in decontamination["eval_sets"]]
    for i, source in enumerate(config["sources"]):
        source["inputs"] = [to_pod(p, f"sources.{i}.inputs") for p in source["inputs"]]
        filters = source.get("filters") or {}
        for name, key in (("language", "model_path"), ("url", "blocklist_file"), ("quality_classifier", "model_path")):
            if (filters.get(name) or {}).get(key):
                filters[name][key] = to_pod(filters[name][key], f"sources.{i}.filters.{name}.{key}")
    return yaml.safe_dump(config, sort_keys=False)


def pod_job(job: Job) -> Job:
    """The job with its run/output dir and every path in its config rewritten to the pods' view."""
    to_pod = PodPaths(job.cluster)
    if job.kind == "train":
        output = to_pod.output(job.output_dir, "--run-dir")
        resolved = _train_config(job.resolved_yaml, to_pod)
    else:
        output = to_pod.output(job.output_dir, "--out (or the data config's output)")
        resolved = _data_config(job.resolved_yaml, to_pod, output)
    return dataclasses.replace(job, output_dir=output, resolved_yaml=resolved)


def _container(c: ClusterConfig, name: str, resources: dict) -> dict:
    return {
        "name": name,
        "image": c.image,
        "resources": resources,
        # The wandb key comes from a Kubernetes secret if one exists, never from the manifest.
        "env": [{"name": "WANDB_API_KEY",
                 "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}}],
        "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": c.k8s.volume.mount_path},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod_template(c: ClusterConfig, container: dict, node_selector: dict, tolerations: list[Toleration]) -> dict:
    spec = {
        "containers": [container],
        "volumes": [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": c.k8s.volume.claim}},
                    # A container's /dev/shm is 64 MB: too small for Ray's object store and NCCL's buffers.
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in tolerations]
    return {"spec": spec}


def manifest(job: Job) -> dict:
    job = pod_job(job)
    c, k = job.cluster, job.cluster.k8s
    head_params = {
        # The KubeRay operator and the job submitter reach the dashboard from other pods,
        # so inside the pod it listens on all interfaces (the pod network, not the host's).
        "dashboard-host": "0.0.0.0",
        # No CPUs on the head: launcher actors and pipeline tasks belong on the workers.
        "num-cpus": "0",
    }
    head = _container(c, "ray-head", {"requests": dict(k.head_requests), "limits": dict(k.head_limits)})
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}]
    workers = {
        "groupName": "gpu-workers" if c.gpus_per_node else "cpu-workers",
        "replicas": c.nodes,
        "minReplicas": c.nodes,
        "maxReplicas": c.nodes,
        "rayStartParams": {},
        "template": _pod_template(c, _container(c, "ray-worker", c.worker_resources()), k.node_selector, k.tolerations),
    }
    spec = {
        "entrypoint": entrypoint(job),
        "runtimeEnvYAML": _dump({"env_vars": {CONFIG_ENV: job.resolved_yaml}}),
        # A submitter Kubernetes Job runs `ray job submit` once the cluster is ready (KubeRay's default).
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "rayClusterSpec": {
            "rayVersion": _ray_version(c.image),
            "headGroupSpec": {"rayStartParams": head_params,
                              "template": _pod_template(c, head, k.head_node_selector, k.head_tolerations)},
            "workerGroupSpecs": [workers],
        },
    }
    if k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": k8s_name(job.name), "namespace": c.namespace}, "spec": spec}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the entrypoint's config, the runtime env) as `|` blocks, readable in --dry-run."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _dump(data: dict) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False)


def render(job: Job) -> str:
    return _dump(manifest(job))


def apply(job: Job) -> str:
    """`kubectl apply` the manifest (from stdin, so no file is left behind); returns kubectl's line."""
    text = render(job)  # before kubectl: a path the pods cannot see is refused even without kubectl
    try:
        out = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, capture_output=True,
                             text=True, check=False)
    except FileNotFoundError:
        raise ClusterError("kubectl not found: install it, or use --dry-run to print the RayJob manifest")
    if out.returncode != 0:
        raise ClusterError(f"kubectl apply failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip()
