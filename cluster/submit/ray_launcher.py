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
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import ray
from ray.exceptions import RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.errors import USER_ERRORS
from cluster.submit import data_command, rank_command
from cluster.submit.prepare import prepare
from cluster.submit.ray_jobs import CONFIG_ENV
from trainer.watchdog import LAUNCHER_PID, ORPHAN_GRACE_S

USER_ERROR = 2  # a rank's exit status for a config or data error: a restart would fail the same way


def write_config(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="pretrain-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@ray.remote
class NodeLauncher:
    """One node's ranks. Started with max_concurrency 2, so `stop` runs while `run` waits."""

    def __init__(self):
        self.ranks: list[subprocess.Popen] = []
        self.stopped = False

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it, for the rendezvous when this is node 0."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:  # only asks the kernel for a free port; the trainer listens on it
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def run(self, run_dir: str, node_rank: int, nodes: int, procs: int, master: tuple[str, int]) -> list[int]:
        """Starts this node's ranks and waits; a failing rank stops its siblings. The ranks stop
        themselves when this actor dies (trainer.distributed.exit_with_launcher)."""
        base = dict(os.environ, MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
                    WORLD_SIZE=str(nodes * procs), LOCAL_WORLD_SIZE=str(procs), NODE_RANK=str(node_rank),
                    **{LAUNCHER_PID: str(os.getpid())})
        for local in range(procs):
            if self.stopped:
                break
            env = dict(base, RANK=str(node_rank * procs + local), LOCAL_RANK=str(local))
            self.ranks.append(subprocess.Popen(rank_command(sys.executable, run_dir), env=env))
        return _wait_all(self.ranks)

    def stop(self, grace_s: float) -> None:
        """SIGTERM the ranks (they checkpoint if their peers can), SIGKILL whatever is left after grace_s."""
        self.stopped = True
        for p in self.ranks:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.ranks:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_all(ranks: list[subprocess.Popen]) -> list[int]:
    while any(p.poll() is None for p in ranks):
        if any(p.returncode not in (None, 0) for p in ranks):
            for p in ranks:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.5)
    return [p.returncode for p in ranks]


def train(config_text: str, out: str, nodes: int, gpus_per_node: int) -> int:
    """The run dir must be on a filesystem every node sees (checkpoints are written by all ranks).
    A failed attempt (a rank killed, a node lost) restarts every rank, up to cluster.max_restarts
    times; each restart resumes from the newest complete checkpoint, as every `pretrain train` does."""
    procs = max(gpus_per_node, 1)
    config = write_config(config_text)
    try:
        max_restarts = prepare(config, out, nodes * procs).cluster.max_restarts
    finally:
        os.unlink(config)
    for attempt in range(max_restarts + 1):
        codes = _attempt(out, nodes, procs, gpus_per_node)
        print(f"rank exit codes by node: {codes}", flush=True)
        flat = [c for node in codes for c in node]
        if all(c == 0 for c in flat):
            return 0
        if USER_ERROR in flat:
            return 1
        if attempt < max_restarts:
            print(f"restart {attempt + 1} of {max_restarts} (cluster.max_restarts): starting every rank again; "
                  "they resume from the newest complete checkpoint", flush=True)
    print(f"giving up after {max_restarts} restart(s) (cluster.max_restarts)", flush=True)
    return 1


def _attempt(out: str, nodes: int, procs: int, gpus_per_node: int) -> list[list[Optional[int]]]:
    """One start of every rank, in a fresh placement group; exit codes by node, None for a lost node."""
    bundle = {"CPU": procs, "GPU": gpus_per_node} if gpus_per_node else {"CPU": procs}
    # SPREAD puts one launcher per node when bundles fill nodes, and still runs when a small
    # cluster (or a test) has to place several on one node.
    group = placement_group([bundle] * nodes, strategy="SPREAD")
    ray.get(group.ready())
    try:
        launchers = [NodeLauncher.options(
            num_cpus=bundle["CPU"], num_gpus=gpus_per_node, max_concurrency=2,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote() for i in range(nodes)]
        try:
            master = ray.get(launchers[0].address.remote())
        except RayError:
            return [[None] * procs for _ in range(nodes)]
        print(f"launching {nodes} node(s) x {procs} rank(s), rendezvous {master[0]}:{master[1]}", flush=True)
        return _wait_nodes(launchers, [a.run.remote(out, i, nodes, procs, master) for i, a in enumerate(launchers)],
                           procs)
    finally:
        remove_placement_group(group)  # ends this attempt's launcher actors


def _wait_nodes(launchers: list, runs: list, procs: int) -> list[list[Optional[int]]]:
    """Every node's exit codes. Once one node fails, the others are stopped: their ranks would wait in
    collectives for the lost peer, and must be gone before a restart resumes from the checkpoints."""
    codes: list = [None] * len(runs)
    pending, stopping = list(runs), False
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = runs.index(done[0])
        try:
            codes[i] = ray.get(done[0])
        except RayError:  # the launcher's process or its node died
            codes[i] = [None] * procs
        if pending and not stopping and any(c != 0 for c in codes[i]):
            stopping = True
            stops = [launchers[runs.index(r)].stop.remote(ORPHAN_GRACE_S) for r in pending]
            ray.wait(stops, num_returns=len(stops), timeout=ORPHAN_GRACE_S + 30)
    return codes


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
