"""The cluster tools' schemas: where a job runs (`ClusterConfig`, configs/cluster/*.yaml), and a
train YAML as they read it (`JobConfig`: the trainer's run config plus that `cluster:` section)."""
from __future__ import annotations

import posixpath
import re
from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from trainer.config import RunConfig, Section

# A Kubernetes resource quantity ("32", "500m", "512Gi", "1.5"); the API server's own grammar, less exponents.
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_SCALE = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
# A DNS-1123 subdomain: what Kubernetes accepts as an object name (the PVC's).
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def quantity(text: str) -> float:
    """A resource quantity's value ("500m" -> 0.5, "1Gi" -> 1073741824.0), for comparing requests with limits."""
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return float(match.group(1)) * _SCALE[match.group(3) or ""]


def _pod_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return posixpath.normpath(path)


def _quantities(values: dict[str, str | int | float]) -> dict[str, str]:
    out = {name: str(value) for name, value in values.items()}
    for value in out.values():
        quantity(value)
    return out


class KubeVolume(Section):
    claim: str = Field(..., description="a PersistentVolumeClaim (ReadWriteMany) every pod mounts: data, run dirs, "
                                        "checkpoints and the run's config.yaml live on it")
    mount_path: str = Field("/mnt/pretrain", description="where every pod mounts it")

    @field_validator("claim")
    @classmethod
    def _claim_name(cls, value: str) -> str:
        if not _K8S_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a Kubernetes object name (lowercase letters, digits, '-', '.')")
        return value

    @field_validator("mount_path")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        return _pod_path(value)


class Toleration(Section):
    """A pod toleration, spelled as in Kubernetes so one can be copied from a node's taints."""

    key: Optional[str] = None
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    tolerationSeconds: Optional[int] = None

    @model_validator(mode="after")
    def _check(self) -> "Toleration":
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        return self


class KubeConfig(Section):
    """Backend k8s (KubeRay): the pods' shared volume, how this machine's paths appear in them, and what
    each pod asks of the scheduler. Worker pods default to cpus_per_node, memory_per_node_gb and
    gpus_per_node, requested and limited alike; `requests`/`limits` override a resource by name."""

    volume: Optional[KubeVolume] = Field(None, description="required: the shared volume every pod mounts")
    path_map: dict[str, str] = Field(default_factory=dict, description="this machine's directory -> the same "
                                     "directory in the pods (under volume.mount_path), e.g. an NFS view of the PVC")
    requests: dict[str, str] = Field(default_factory=dict, description="worker pod requests, e.g. {cpu: 30}")
    limits: dict[str, str] = Field(default_factory=dict, description="worker pod limits, e.g. {memory: 520Gi}")
    head_requests: dict[str, str] = Field(default_factory=lambda: {"cpu": "2", "memory": "8Gi"},
                                          description="the head pod runs the job's driver only")
    head_limits: dict[str, str] = Field(default_factory=lambda: {"cpu": "2", "memory": "8Gi"})
    gpu_resource: str = Field("nvidia.com/gpu", description="the GPUs' extended resource name (amd.com/gpu, ...)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="worker pods' node labels")
    tolerations: list[Toleration] = Field(default_factory=list, description="worker pods' tolerations")
    head_node_selector: dict[str, str] = Field(default_factory=dict)
    head_tolerations: list[Toleration] = Field(default_factory=list)
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="keep the finished cluster this long for logs")
    active_deadline_seconds: Optional[PositiveInt] = Field(None, description="stop the job after this long")

    @field_validator("requests", "limits", "head_requests", "head_limits", mode="before")
    @classmethod
    def _resource_quantities(cls, value):
        return _quantities(value) if isinstance(value, dict) else value

    @field_validator("path_map")
    @classmethod
    def _absolute_paths(cls, value: dict[str, str]) -> dict[str, str]:
        return {_pod_path(local): _pod_path(pod) for local, pod in value.items()}

    @model_validator(mode="after")
    def _check(self) -> "KubeConfig":
        for name in ("requests", "limits"):
            if self.gpu_resource in getattr(self, name):
                raise ValueError(f"{name}.{self.gpu_resource}: set GPUs with gpus_per_node instead")
        check_requests(self.head_requests, self.head_limits, "k8s.head_")
        mount = self.volume.mount_path if self.volume else None
        for local, pod in self.path_map.items():
            if mount and not is_under(pod, mount):
                raise ValueError(f"path_map.{local}: {pod} is not on the shared volume (volume.mount_path "
                                 f"{mount}), so the pods would not see it")
        return self


def check_requests(requests: dict[str, str], limits: dict[str, str], prefix: str = "") -> None:
    """Kubernetes refuses a pod whose request exceeds its limit; say so before anything is applied."""
    for name, value in requests.items():
        limit = limits.get(name)
        if limit is not None and quantity(value) > quantity(limit):
            raise ValueError(f"{prefix}requests.{name}: {value} is above its limit {limit} ({prefix}limits.{name})")


def is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class ClusterConfig(Section):
    backend: Literal["local", "ray", "slurm", "k8s", "ssh"] = "local"
    nodes: PositiveInt = 1
    gpus_per_node: int = Field(0, ge=0)
    gpu_memory_gb: Optional[PositiveFloat] = None
    address: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit: str = "48:00:00"
    image: str = "rayproject/ray:2.40.0-py311-gpu"
    namespace: str = "default"
    assumed_mfu: float = Field(0.4, gt=0.0, le=1.0)
    gpu_tflops: Optional[PositiveFloat] = Field(None, description="peak dense bf16 TFLOP/s of one GPU, for "
                                                "step-time estimates; default: the hardware preset's")
    hardware: Optional[str] = Field(None, description="the planner's GPU and network preset: a100-80gb (default), "
                                                      "h100, h200 (cluster.comm.PRESETS)")
    nvlink_gbps: Optional[PositiveFloat] = Field(None, description="GB/s per GPU, one direction, inside a node; "
                                                 "default: the preset's")
    ib_gbps: Optional[PositiveFloat] = Field(None, description="GB/s per GPU, one direction, between nodes "
                                             "(InfiniBand); default: the preset's")
    nvlink_latency_us: Optional[PositiveFloat] = Field(None, description="microseconds per collective call inside "
                                                       "a node; default: the preset's")
    ib_latency_us: Optional[PositiveFloat] = Field(None, description="microseconds per collective call spanning "
                                                   "nodes; default: the preset's")
    comm_overlap: float = Field(1.0, ge=0.0, le=1.0, description="the fraction of compute time that overlappable "
                                "communication (ZeRO-3's prefetched gathers and reduce-scatters) can hide behind")
    cpus_per_node: PositiveInt = Field(8, description="CPU cores requested per node (SLURM, KubeRay pods)")
    memory_per_node_gb: PositiveInt = Field(64, description="host memory requested per node (KubeRay pods)")
    python: Optional[str] = Field(None, description="interpreter on the cluster; default: this one for "
                                                    "slurm/ssh (shared filesystem), `python` for ray/k8s images")
    hostfile: Optional[str] = Field(None, description="DeepSpeed hostfile (`host slots=G` lines) for backend ssh")
    max_restarts: int = Field(3, ge=0, description="backend ray/k8s: times a training job restarts its ranks after "
                                                     "a failure (a lost worker), resuming from the newest checkpoint")
    k8s: KubeConfig = Field(default_factory=KubeConfig, description="backend k8s: volume, paths, pod resources")

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, value: Optional[str]) -> Optional[str]:
        from cluster.comm import PRESETS

        if value is not None and value.lower() not in PRESETS:
            raise ValueError(f"{value!r} is not a hardware preset ({', '.join(PRESETS)})")
        return value

    def plan_hardware(self, **overrides):
        """The preset with this section's figures, then `overrides` (CLI flags; None keeps), on top."""
        from cluster.comm import hardware

        name = overrides.pop("hardware", None) or self.hardware
        keys = {"gpu_tflops": self.gpu_tflops, "nvlink_gbps": self.nvlink_gbps, "ib_gbps": self.ib_gbps,
                "nvlink_latency_us": self.nvlink_latency_us, "ib_latency_us": self.ib_latency_us,
                "gpus_per_node": self.gpus_per_node or None, "gpu_memory_gb": self.gpu_memory_gb}
        keys.update({k: v for k, v in overrides.items() if v is not None})
        return hardware(name, **keys)

    def worker_resources(self) -> dict[str, dict[str, str]]:
        """A worker pod's requests and limits: the node's size, with `k8s.requests`/`k8s.limits` on top."""
        node = {"cpu": str(self.cpus_per_node), "memory": f"{self.memory_per_node_gb}Gi"}
        if self.gpus_per_node:  # extended resources: Kubernetes requires the request to equal the limit
            node[self.k8s.gpu_resource] = str(self.gpus_per_node)
        return {"requests": {**node, **self.k8s.requests}, "limits": {**node, **self.k8s.limits}}

    @model_validator(mode="after")
    def _check_worker_resources(self) -> "ClusterConfig":
        check_requests(**self.worker_resources(), prefix="k8s.")
        return self


class JobConfig(RunConfig):
    """A train YAML: the run, and the cluster it is submitted to. Saved whole as RUN/config.yaml, where
    the trainer keeps `cluster:` as a record of where the run went."""

    cluster: ClusterConfig = ClusterConfig()

    @field_validator("cluster", mode="before")
    @classmethod
    def _none_is_default(cls, value):
        return {} if value is None else value  # a RunConfig without a cluster: dumps it as null
