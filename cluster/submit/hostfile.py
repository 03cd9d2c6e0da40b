"""Plain SSH clusters: the DeepSpeed launcher with a hostfile (`host slots=G` per line).

DeepSpeed reaches every host over ssh (pdsh), starts `deepspeed.launcher.launch` there, which
sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR and runs our CLI as a module. `--no_local_rank`
because the trainer reads LOCAL_RANK from the environment rather than from an argument.
Hosts must share the filesystem holding the code, the config and the run dir."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cluster.errors import ClusterError
from cluster.submit import Job, prepare_command, rank_command

MASTER_PORT = 29500
_LINE = re.compile(r"^([A-Za-z0-9_.:\-]+)\s+slots=(\d+)$")


def parse_hostfile(text: str, source: str = "hostfile") -> list[tuple[str, int]]:
    """[(host, slots)]; comments and blank lines are skipped, anything else must be `host slots=N`."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise ClusterError(f"{source}:{number}: expected `HOST slots=N` (N >= 1), got {raw.strip()!r}")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise ClusterError(f"{source}: no hosts")
    return hosts


def hostfile_text(hosts: list[tuple[str, int]]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts)


def hosts_for(job: Job, hosts_arg: str | None) -> list[tuple[str, int]]:
    """From --hosts a,b (each with the job's GPUs per node) or the cluster's hostfile."""
    if hosts_arg:
        return [(h, job.procs_per_node) for h, _ in parse_hostfile(
            "\n".join(f"{h.strip()} slots=1" for h in hosts_arg.split(",") if h.strip()), "--hosts")]
    if job.cluster.hostfile:
        path = Path(job.cluster.hostfile)
        if not path.is_file():
            raise ClusterError(f"{path}: hostfile not found")
        return parse_hostfile(path.read_text(), str(path))
    raise ClusterError("backend ssh needs hosts: --hosts host1,host2 or cluster.hostfile")


def commands(job: Job, hostfile: Path, hosts: list[tuple[str, int]]) -> list[list[str]]:
    """Prepare the run dir for all the hosts' slots, then the DeepSpeed launcher over the hosts."""
    python = job.python(shared_filesystem=True)
    world = sum(slots for _, slots in hosts)
    prepare = prepare_command(job, python)
    prepare[prepare.index("--world") + 1] = str(world)
    launcher = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                "--master_addr", hosts[0][0], "--master_port", str(MASTER_PORT), "--no_local_rank",
                "--module", *rank_command(python, job.output_dir)[2:]]
    return [prepare, launcher]


def launch(job: Job, hosts: list[tuple[str, int]]) -> int:
    """Writes the hostfile into the run dir and runs the launcher in the foreground."""
    run_dir = Path(job.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hostfile = run_dir / "hostfile"
    hostfile.write_text(hostfile_text(hosts))
    prepare, launcher = commands(job, hostfile, hosts)
    try:
        return subprocess.call(prepare) or subprocess.call(launcher)
    except FileNotFoundError as e:
        raise ClusterError(f"cannot start the DeepSpeed launcher: {e}") from None
