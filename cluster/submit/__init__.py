"""What every backend launches: one `Job` (a training run or a data-pipeline run) and the
per-rank command line. Backends differ only in how they start ranks and rendezvous."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trainer.config import ClusterConfig

JobKind = Literal["train", "data"]


@dataclass
class Job:
    kind: JobKind
    config_path: Path            # the user's YAML, absolute (SLURM/ssh run it on a shared filesystem)
    resolved_yaml: str           # the validated config with overrides applied (Ray and KubeRay ship this text)
    output_dir: str              # the run dir (train) or the data output dir (data)
    name: str
    cluster: ClusterConfig
    overrides: list[str] = field(default_factory=list)

    @property
    def procs_per_node(self) -> int:
        """Ranks per node: one per GPU, or one CPU rank on GPU-less nodes."""
        return max(self.cluster.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.procs_per_node

    def python(self, shared_filesystem: bool) -> str:
        """The cluster's interpreter: ours when nodes share our filesystem, else the image's `python`."""
        if self.cluster.python:
            return self.cluster.python
        return sys.executable if shared_filesystem else "python"


def pretrain_args(kind: JobKind, config_path: str, output_dir: str, overrides: list[str] = ()) -> list[str]:
    """Arguments after `python -m cluster.cli` that run one rank of a training job, or a data job's driver."""
    if kind == "data":
        return ["data", "run", config_path, "--out", output_dir]
    args = ["train", config_path, "--run-dir", output_dir]
    for text in overrides:
        args += ["--set", text]
    return args
