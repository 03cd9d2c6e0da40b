"""SLURM: an sbatch script for N nodes x G GPUs that starts one trainer rank per GPU with `srun`.

Rendezvous comes from SLURM's own variables (first host of the allocation, a port derived from the
job id, SLURM_PROCID/LOCALID/NTASKS as rank/local rank/world size), so no ssh or pdsh is needed.
Preemption and the time limit both end in a requeue; the trainer resumes from the newest valid
checkpoint in the run dir on its own, so the requeued job simply runs the same command again.

Every user-supplied value enters the script once, through `shlex.quote`, as a shell variable that
is only ever expanded inside double quotes; the srun wrapper is a constant string that receives
the command as positional arguments. A path holding spaces, quotes or `;` stays one argument.
"""
from __future__ import annotations

import re
import shlex
import subprocess

from cluster.errors import ClusterError
from cluster.submit import Job, prepare_command, rank_command

# Seconds before the time limit at which SLURM signals the batch shell, leaving time for a checkpoint.
GRACE_SECONDS = 300

# Maps SLURM's task variables onto the torch.distributed ones the trainer reads, then becomes the rank.
RANK_WRAPPER = ('export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS" '
                'LOCAL_WORLD_SIZE="$SLURM_NTASKS_PER_NODE"; exec "$@"')


def _directives(job: Job) -> list[str]:
    c = job.cluster
    lines = [
        f"--job-name={job.name}",
        f"--nodes={c.nodes}",
        f"--ntasks-per-node={job.procs_per_node}",
        f"--cpus-per-task={max(c.cpus_per_node // job.procs_per_node, 1)}",
        f"--time={c.time_limit}",
        "--requeue",
        f"--signal=B:USR1@{GRACE_SECONDS}",
        "--open-mode=append",
        f"--output={job.output_dir}/slurm-%j.out",
    ]
    if c.gpus_per_node:
        lines.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.partition:
        lines.append(f"--partition={c.partition}")
    if c.account:
        lines.append(f"--account={c.account}")
    for value in lines:
        # #SBATCH lines are parsed by sbatch, not the shell: a newline would smuggle in a directive.
        if "\n" in value or "\r" in value:
            raise ClusterError(f"SLURM directive {value!r} must not contain a line break")
    return [f"#SBATCH {shlex.quote(v)}" for v in lines]


def render(job: Job) -> str:
    """The sbatch script text."""
    python = job.python(shared_filesystem=True)
    body = f"""\
set -euo pipefail
RUN_DIR={shlex.quote(job.output_dir)}
mkdir -p "$RUN_DIR"
# Once, before the ranks: validate the config for $SLURM_NTASKS ranks and write $RUN_DIR/config.yaml.
{shlex.join(prepare_command(job, python))}
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
echo "job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}}: $SLURM_NNODES nodes, rendezvous $MASTER_ADDR:$MASTER_PORT"

# Near the time limit: stop the ranks with SIGTERM (the trainer checkpoints on it) and requeue;
# the requeued job resumes from that checkpoint. Preemption requeues through --requeue directly.
requeue() {{
  echo "time limit near: checkpointing and requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  kill -TERM "$SRUN_PID" 2>/dev/null || true
}}
trap requeue USR1

# srun runs in the background so the shell can take USR1 while the ranks train.
srun --kill-on-bad-exit=1 bash -c {shlex.quote(RANK_WRAPPER)} rank {shlex.join(rank_command(python, job.output_dir))} &
SRUN_PID=$!
status=0
wait "$SRUN_PID" || status=$?
# A trapped USR1 interrupts the wait while the ranks are still checkpointing: wait for them too.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || status=$?; done
exit "$status"
"""
    return "\n".join(["#!/bin/bash", *_directives(job), "", body])


def submit(job: Job, script_path) -> str:
    """Writes the script and calls sbatch; returns SLURM's job id."""
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(render(job))
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ClusterError("sbatch not found: run on a SLURM login node, or use --dry-run to print the script")
    if out.returncode != 0:
        raise ClusterError(f"sbatch failed: {out.stderr.strip() or out.stdout.strip()}")
    match = re.match(r"\s*(\d+)", out.stdout)
    if not match:
        raise ClusterError(f"sbatch printed no job id: {out.stdout.strip()!r}")
    return match.group(1)
