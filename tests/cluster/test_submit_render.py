"""SLURM script and DeepSpeed hostfile launch: generated for a 2-node x 8-GPU layout, parsed back and
checked field by field; hostile paths stay single arguments. (The KubeRay RayJob: test_kuberay.py.)"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.errors import ClusterError
from cluster.submit import hostfile

HOSTILE = 'a b;touch INJECTED;$(touch INJECTED2)`touch INJECTED3`"\'x'


@pytest.fixture
def hostile_config(tmp_path, repo_root) -> Path:
    """A copy of the tiny GPT train config under a directory name built to break naive quoting."""
    folder = tmp_path / HOSTILE
    folder.mkdir()
    text = (repo_root / "configs/train/tiny-gpt-cpu.yaml").read_text()
    path = folder / "train.yaml"
    path.write_text(text.replace("../model/tiny-gpt.yaml", str(repo_root / "configs/model/tiny-gpt.yaml")))
    return path


def dry_run(capsys, *args: str) -> str:
    assert main(["submit", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_sbatch_script_for_2_nodes_x_8_gpus(capsys, hostile_config, tmp_path):
    run_dir = tmp_path / f"run {HOSTILE}"
    script = dry_run(capsys, str(hostile_config), "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                     "--run-dir", str(run_dir), "--name", "t1", "--set", "train.lr=1e-3")
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    directives = dict(shlex.split(line[len("#SBATCH "):])[0].lstrip("-").split("=", 1)
                      for line in script.splitlines() if line.startswith("#SBATCH") and "=" in line)
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "8"
    assert directives["gpus-per-node"] == "8" and directives["job-name"] == "t1"
    assert directives["output"] == f"{run_dir}/slurm-%j.out"
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST"' in script


def test_sbatch_script_runs_each_rank_with_the_exact_arguments(capsys, hostile_config, tmp_path):
    """Execute the script with stand-ins for srun/scontrol and the interpreter: the rank must get the
    hostile path as one argument, rank variables from SLURM's, and no command may have run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nSLURM_PROCID=1 SLURM_LOCALID=1 exec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-a\necho node-b\n")
    recorder = bin_dir / "python"
    record = tmp_path / "argv.txt"
    recorder.write_text(f'#!/bin/bash\n{{ printf "%s\\n" "$@"; echo "env $RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR '
                        f'$MASTER_PORT"; echo ---; }} >> {shlex.quote(str(record))}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / f"run {HOSTILE}"
    script = dry_run(capsys, str(hostile_config), "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                     "--run-dir", str(run_dir), "--set", "cluster.python=" + str(recorder))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_ID="1234", SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", SLURM_NNODES="2")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    prepare, rank, _ = [call.strip("\n").split("\n") for call in record.read_text().split("---")]
    assert prepare[:-1] == ["-m", "cluster.submit.prepare", str(hostile_config), str(run_dir), "--world", "16",
                            "--set", f"cluster.python={recorder}"]
    assert rank == ["-m", "trainer.main", str(run_dir), "env 1 1 16 node-a 21234"]
    assert run_dir.is_dir() and not list(tmp_path.rglob("INJECTED*"))


def test_sbatch_refuses_a_newline_in_a_directive(capsys, hostile_config, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text('backend: slurm\npartition: "gpu\\n#SBATCH --uid=0"\n')
    assert main(["submit", str(hostile_config), "--cluster", str(cluster), "--dry-run"]) == 2
    assert "must not contain a line break" in capsys.readouterr().err


def test_hostfile_launch_command(capsys, hostile_config, tmp_path):
    out = dry_run(capsys, str(hostile_config), "--backend", "ssh", "--hosts", "node-a,node-b", "--gpus-per-node",
                  "8", "--run-dir", str(tmp_path / "run"))
    hosts_text, command = out.split("\n", 1)[1].rsplit("node-b slots=8\n", 1)
    assert hosts_text == "node-a slots=8\n"
    prepare, launcher = (shlex.split(line) for line in command.strip().split("\n"))
    assert prepare[1:4] == ["-m", "cluster.submit.prepare", str(hostile_config)]
    assert prepare[prepare.index("--world") + 1] == "16"
    assert launcher[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_local_rank" in launcher
    assert launcher[launcher.index("--master_addr") + 1] == "node-a"
    assert launcher[launcher.index("--module") + 1:] == ["trainer.main", str(tmp_path / "run")]


def test_hostfile_parsing_rejects_garbage():
    assert hostfile.parse_hostfile("# cluster\nnode-1 slots=8\n\nnode-2 slots=4  # half\n") == [("node-1", 8), ("node-2", 4)]
    with pytest.raises(ClusterError, match=r"hosts:2: expected `HOST slots=N`"):
        hostfile.parse_hostfile("a slots=1\nb;rm slots=2\n", "hosts")


def test_data_configs_only_run_on_ray(capsys, repo_root):
    assert main(["submit", str(repo_root / "configs/data/sample.yaml"), "--backend", "slurm", "--dry-run"]) == 2
    assert "data-pipeline jobs run on Ray" in capsys.readouterr().err


def test_no_backend_is_an_error(capsys, hostile_config):
    assert main(["submit", str(hostile_config), "--dry-run"]) == 2
    assert "no backend" in capsys.readouterr().err


def test_plan_flag_puts_the_planned_layout_into_the_job(capsys, hostile_config, tmp_path, repo_root):
    script = dry_run(capsys, str(hostile_config), "--cluster", str(repo_root / "configs/cluster/slurm-2x8.yaml"),
                     "--plan")
    assert "--set parallel.zero_stage=0" in script and "--set train.global_batch_size=16" in script
    assert "--world 16" in script
    tiny_gpus = tmp_path / "tiny-gpus.yaml"
    tiny_gpus.write_text("backend: slurm\nnodes: 1\ngpus_per_node: 2\ngpu_memory_gb: 0.01\n")
    assert main(["submit", str(hostile_config), "--cluster", str(tiny_gpus), "--plan", "--dry-run"]) == 2
    assert "does not fit on 2 x 0.01 GB GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].glob("configs/cluster/*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_cluster_configs_validate(path):
    from cluster.config import ClusterConfig
    from cluster.configio import load_config

    assert load_config(path, ClusterConfig).backend in {"ray", "slurm", "k8s", "ssh"}


def test_prepare_validates_for_the_job_world_size_and_writes_the_config(tmp_path, capsys, repo_root):
    from cluster.submit import prepare

    data = tmp_path / "shards"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # prepare only checks that the data run finished
    config = str(repo_root / "configs/train/tiny-switch-cpu.yaml")
    sets = ["--set", f"data.path={data}", "--set", "parallel.ep_size=2"]
    assert prepare.main([config, str(tmp_path / "run"), "--world", "1", *sets]) == 2
    assert "ep_size" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert prepare.main([config, str(tmp_path / "run"), "--world", "2", *sets]) == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["parallel"]["ep_size"] == 2 and written["data"]["path"] == str(data)


def test_ray_job_carries_the_restart_count_and_refuses_a_negative_one(capsys, hostile_config):
    from cluster.submit.ray_jobs import CONFIG_ENV

    out = dry_run(capsys, str(hostile_config), "--backend", "ray", "--set", "cluster.max_restarts=5")
    assert yaml.safe_load(out.split(f"{CONFIG_ENV}:\n", 1)[1])["cluster"]["max_restarts"] == 5
    assert main(["submit", str(hostile_config), "--backend", "ray", "--set", "cluster.max_restarts=-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cluster.max_restarts" in err, err
