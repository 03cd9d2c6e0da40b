"""What every backend launches: one `Job` (a training run or a data-pipeline run) and the
per-rank command line. Backends differ only in how they start ranks and rendezvous."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cluster.config import ClusterConfig

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


def prepare_command(job: Job, python: str) -> list[str]:
    """Run once before the ranks: validates the config for the job's world size and writes RUN/config.yaml."""
    cmd = [python, "-m", "cluster.submit.prepare", str(job.config_path), job.output_dir, "--world", str(job.world_size)]
    for text in job.overrides:
        cmd += ["--set", text]
    return cmd


def rank_command(python: str, run_dir: str) -> list[str]:
    """One training rank; its rank and world come from the torch.distributed environment variables."""
    return [python, "-m", "trainer.main", run_dir]


def data_command(python: str, config_path: str, output_dir: str) -> list[str]:
    return [python, "-m", "cluster.cli", "data", "run", config_path, "--out", output_dir]
