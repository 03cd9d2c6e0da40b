"""`pretrain submit CONFIG --backend ray|slurm|k8s|ssh` and `pretrain jobs list|status|logs|stop`.

A train YAML (it has `model:`/`train:`) submits a training run; any other YAML is a data-pipeline
config and submits `pretrain data run` (Ray and Kubernetes only: the pipeline runs on Ray)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BACKENDS = ["ray", "slurm", "k8s", "ssh"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run training or the data pipeline on a cluster",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a train YAML (training run) or a data YAML (pipeline run)")
    p.add_argument("--backend", choices=BACKENDS, help="default: the config's cluster.backend")
    p.add_argument("--cluster", metavar="FILE", help="a cluster YAML (configs/cluster/...): nodes, GPUs, partition...")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--nodes", type=int, help="number of nodes (overrides the cluster config)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node; 0 runs one CPU rank per node")
    p.add_argument("--run-dir", "--out", dest="output_dir", help="run dir (train) or data output dir")
    p.add_argument("--name", help="job name / Ray submission id (default: pretrain-KIND-CONFIG-TIME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--hosts", help="backend ssh: comma-separated hosts (else cluster.hostfile)")
    p.add_argument("--plan", action="store_true",
                   help="apply `pretrain plan`'s layout for nodes x GPUs (needs cluster.gpu_memory_gb); "
                        "refuse to submit when nothing fits")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script / RayJob manifest / launch command instead of submitting")
    p.add_argument("--follow", action="store_true", help="backend ray: stream the logs until the job ends")
    p.set_defaults(func=run_submit)
    _register_jobs(sub)


def _register_jobs(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND", required=True)
    for name, (helptext, handler) in JOBS_COMMANDS.items():
        q = jsub.add_parser(name, help=helptext)
        if name != "list":
            q.add_argument("job_id", help="the submission id printed by `pretrain submit`")
        q.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
        q.set_defaults(func=handler)
    jsub.choices["status"].add_argument("--wait", action="store_true",
                                        help="wait until the job has ended; exit 1 unless it SUCCEEDED")
    jsub.choices["logs"].add_argument("--follow", "-f", action="store_true",
                                      help="stream until the job ends; exit 1 unless it SUCCEEDED")
    jsub.choices["stop"].add_argument("--no-wait", action="store_true", help="return without waiting for STOPPED")


def run_submit(args: argparse.Namespace) -> int:
    from cluster.errors import ClusterError
    from cluster.submit.build import build_job

    job = build_job(args)
    backend = job.cluster.backend
    if job.kind == "data" and backend not in ("ray", "k8s"):
        raise ClusterError(f"data-pipeline jobs run on Ray: use --backend ray or k8s, not {backend}")
    return {"ray": _submit_ray, "slurm": _submit_slurm, "k8s": _submit_k8s, "ssh": _submit_ssh}[backend](job, args)


def _submit_ray(job, args) -> int:
    from cluster.submit import ray_jobs

    if args.dry_run:
        print(f"entrypoint: {ray_jobs.entrypoint(job, ray_jobs.is_local(args.address))}")
        print(f"runtime_env.env_vars.{ray_jobs.CONFIG_ENV}:\n{job.resolved_yaml}")
        return 0
    job_id = ray_jobs.submit(job, args.address)
    print(f"submitted {job.kind} job {job_id} to {ray_jobs.resolve_address(args.address)}; output: {job.output_dir}")
    if not args.follow:
        print(f"follow it with: pretrain jobs logs {job_id} --follow")
        return 0
    state = ray_jobs.follow(args.address, job_id)
    print(f"job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _submit_slurm(job, args) -> int:
    from cluster.submit import slurm

    if args.dry_run:
        print(slurm.render(job), end="")
        return 0
    script = Path(job.output_dir) / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    job_id = slurm.submit(job, script)
    print(f"submitted SLURM job {job_id} ({script}); run dir: {job.output_dir}")
    return 0


def _submit_k8s(job, args) -> int:
    from cluster.submit import kuberay

    if args.dry_run:
        print(kuberay.render(job), end="")
        return 0
    print(kuberay.apply(job))
    return 0


def _submit_ssh(job, args) -> int:
    import shlex

    from cluster.submit import hostfile

    hosts = hostfile.hosts_for(job, args.hosts)
    if args.dry_run:
        print(f"# {Path(job.output_dir) / 'hostfile'}\n{hostfile.hostfile_text(hosts)}", end="")
        for command in hostfile.commands(job, Path(job.output_dir) / "hostfile", hosts):
            print(shlex.join(command))
        return 0
    return hostfile.launch(job, hosts)


def run_jobs_list(args: argparse.Namespace) -> int:
    from cluster.submit import ray_jobs

    rows = ray_jobs.list_jobs(args.address)
    print(f"{'SUBMISSION ID':40} {'STATUS':10} {'STARTED':19} ENTRYPOINT")
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        print(f"{j.submission_id or j.job_id or '-':40} {j.status.value:10} {started:19} {j.entrypoint[:80]}")
    return 0


def run_jobs_status(args: argparse.Namespace) -> int:
    from cluster.submit import ray_jobs

    state = ray_jobs.wait(args.address, args.job_id) if args.wait else ray_jobs.status(args.address, args.job_id)
    job = ray_jobs.info(args.address, args.job_id)
    print(f"{args.job_id}: {state}" + (f" ({job.message})" if job.message else ""))
    return 0 if not args.wait or state == "SUCCEEDED" else 1


def run_jobs_logs(args: argparse.Namespace) -> int:
    from cluster.submit import ray_jobs

    if args.follow:
        state = ray_jobs.follow(args.address, args.job_id)
        print(f"job {args.job_id}: {state}", file=sys.stderr)
        return 0 if state == "SUCCEEDED" else 1
    sys.stdout.write(ray_jobs.logs(args.address, args.job_id))
    return 0


def run_jobs_stop(args: argparse.Namespace) -> int:
    from cluster.submit import ray_jobs

    state = ray_jobs.stop(args.address, args.job_id, wait_s=0 if args.no_wait else 60)
    print(f"{args.job_id}: {state}")
    return 0


JOBS_COMMANDS = {"list": ("all jobs", run_jobs_list), "status": ("a job's status", run_jobs_status),
                 "logs": ("a job's logs", run_jobs_logs), "stop": ("stop a job", run_jobs_stop)}
