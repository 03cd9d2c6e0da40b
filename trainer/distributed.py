"""Process groups: start and stop torch.distributed (gloo on CPU, NCCL on GPU), a free local port
for single-node rendezvous, and the expert-parallel groups that DeepSpeed's MoE support expects."""
from __future__ import annotations

import os
import socket
from typing import Optional

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """gloo on CPU, NCCL on GPU (DeepSpeed's accelerator picks); works without a launcher as rank 0 of 1."""
    if "WORLD_SIZE" not in os.environ:  # no launcher: a world of one on a port nobody else holds
        for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, default)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def shutdown_distributed() -> None:
    """Tear down so the same process can train again (tests, notebooks): DeepSpeed caches process
    groups in module globals that would otherwise point at the destroyed ones."""
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    groups._WORLD_GROUP = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's key for the expert and expert-data-parallel groups of this size (its MoE layers use the same)."""
    return f"ep_size_{ep_size}"


def expert_parallel_group(ep_size: int) -> Optional[dist.ProcessGroup]:
    """Creates the expert and expert-data-parallel groups the way DeepSpeed MoE does (the engine looks
    them up by the experts' `group_name`, even for ep_size 1) and returns the all-to-all group the
    Switch layers exchange tokens in: None when every rank holds all experts."""
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name) if ep_size > 1 else None


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's place in its expert-parallel group: which E/ep_size experts it holds."""
    return groups._get_expert_parallel_rank(expert_group_name(ep_size)) if ep_size > 1 else 0


def expert_data_parallel_rank(group_name: str) -> int:
    """This rank's place among the ranks that hold the same experts (DeepSpeed's group of that name)."""
    return groups._get_expert_data_parallel_rank(group_name)
