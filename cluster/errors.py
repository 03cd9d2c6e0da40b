"""User errors of the cluster commands: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations

from data_pipeline.errors import PipelineError
from trainer.errors import ConfigError, TrainError


class ClusterError(Exception):
    """A request that cannot be carried out as asked (no feasible plan, unreachable cluster, bad flag)."""


# What means "the user asked for something wrong" anywhere in the tools: one line, exit 2, no traceback.
USER_ERRORS = (ConfigError, TrainError, PipelineError, ClusterError, FileNotFoundError, PermissionError)
