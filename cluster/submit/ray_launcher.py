"""The driver of a Ray job submitted by `pretrain submit --backend ray|k8s`.

Data jobs: runs `pretrain data run` here; the pipeline connects to this Ray cluster itself
(a job driver inherits RAY_ADDRESS).

Training jobs: one `NodeLauncher` actor per node, reserved together in a placement group, each
holding the node's GPUs and starting one trainer process per GPU with the torch.distributed
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set: the same contract as
torchrun, the DeepSpeed launcher and our SLURM script. We chose this over Ray Train's
TorchTrainer because the trainer owns its DeepSpeed engine, process group, checkpoints and
automatic resume; TorchTrainer would set up the process group and checkpointing itself and run
a different code path on Ray than everywhere else. Here, training on Ray *is* `pretrain train`.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.errors import USER_ERRORS
from cluster.submit import data_command, rank_command
from cluster.submit.prepare import prepare
from cluster.submit.ray_jobs import CONFIG_ENV

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in each rank before exec: if the launcher actor is killed (job stopped), the rank gets
    SIGTERM (and checkpoints) instead of training on as an orphan."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def write_config(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="pretrain-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@ray.remote
class NodeLauncher:
    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it, for the rendezvous when this is node 0."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:  # only asks the kernel for a free port; the trainer listens on it
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def run(self, run_dir: str, node_rank: int, nodes: int, procs: int, master: tuple[str, int]) -> list[int]:
        """Starts this node's ranks and waits; a failing rank stops its siblings."""
        base = dict(os.environ, MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
                    WORLD_SIZE=str(nodes * procs), LOCAL_WORLD_SIZE=str(procs), NODE_RANK=str(node_rank))
        ranks = []
        for local in range(procs):
            env = dict(base, RANK=str(node_rank * procs + local), LOCAL_RANK=str(local))
            ranks.append(subprocess.Popen(rank_command(sys.executable, run_dir), env=env,
                                          preexec_fn=_die_with_parent))
        return _wait_all(ranks)


def _wait_all(ranks: list[subprocess.Popen]) -> list[int]:
    while any(p.poll() is None for p in ranks):
        if any(p.returncode not in (None, 0) for p in ranks):
            for p in ranks:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.5)
    return [p.returncode for p in ranks]


def train(config_text: str, out: str, nodes: int, gpus_per_node: int) -> int:
    """The run dir must be on a filesystem every node sees (checkpoints are written by all ranks)."""
    procs = max(gpus_per_node, 1)
    config = write_config(config_text)
    try:
        prepare(config, out, nodes * procs)
    finally:
        os.unlink(config)
    bundle = {"CPU": procs, "GPU": gpus_per_node} if gpus_per_node else {"CPU": procs}
    # SPREAD puts one launcher per node when bundles fill nodes, and still runs when a small
    # cluster (or a test) has to place several on one node.
    group = placement_group([bundle] * nodes, strategy="SPREAD")
    ray.get(group.ready())
    launchers = [NodeLauncher.options(
        num_cpus=bundle["CPU"], num_gpus=gpus_per_node,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
    ).remote() for i in range(nodes)]
    master = ray.get(launchers[0].address.remote())
    print(f"launching {nodes} node(s) x {procs} rank(s), rendezvous {master[0]}:{master[1]}", flush=True)
    codes = ray.get([a.run.remote(out, i, nodes, procs, master) for i, a in enumerate(launchers)])
    print(f"rank exit codes by node: {codes}", flush=True)
    return 0 if all(c == 0 for node in codes for c in node) else 1


def data(config_text: str, out: str) -> int:
    config = write_config(config_text)
    try:
        return subprocess.call(data_command(sys.executable, config, out))
    finally:
        os.unlink(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="driver of a `pretrain submit` Ray job")
    parser.add_argument("kind", choices=["train", "data"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    args = parser.parse_args(argv)
    config_text = os.environ.get(CONFIG_ENV)
    if not config_text:
        print(f"error: {CONFIG_ENV} is not set: submit with `pretrain submit`", file=sys.stderr)
        return 2
    if args.kind == "data":
        return data(config_text, args.out)
    ray.init()
    try:
        return train(config_text, args.out, args.nodes, args.gpus_per_node)
    except USER_ERRORS as e:  # e.g. a batch that does not divide over this job's ranks
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
