"""The cluster tools' schemas: where a job runs (`ClusterConfig`, configs/cluster/*.yaml), and a
train YAML as they read it (`JobConfig`: the trainer's run config plus that `cluster:` section)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from trainer.config import RunConfig, Section


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
    gpu_tflops: PositiveFloat = Field(312.0, description="peak dense bf16 TFLOP/s of one GPU, for step-time "
                                                          "estimates (A100: 312, H100 SXM: 989)")
    cpus_per_node: PositiveInt = Field(8, description="CPU cores requested per node (SLURM, KubeRay pods)")
    memory_per_node_gb: PositiveInt = Field(64, description="host memory requested per node (KubeRay pods)")
    python: Optional[str] = Field(None, description="interpreter on the cluster; default: this one for "
                                                    "slurm/ssh (shared filesystem), `python` for ray/k8s images")
    hostfile: Optional[str] = Field(None, description="DeepSpeed hostfile (`host slots=G` lines) for backend ssh")
    max_restarts: int = Field(3, ge=0, description="backend ray/k8s: times a training job restarts its ranks after "
                                                     "a failure (a lost worker), resuming from the newest checkpoint")


class JobConfig(RunConfig):
    """A train YAML: the run, and the cluster it is submitted to. Saved whole as RUN/config.yaml, where
    the trainer keeps `cluster:` as a record of where the run went."""

    cluster: ClusterConfig = ClusterConfig()

    @field_validator("cluster", mode="before")
    @classmethod
    def _none_is_default(cls, value):
        return {} if value is None else value  # a RunConfig without a cluster: dumps it as null
