"""Start a run: lay the config out for the world size, write RUN/config.yaml (resolved) and run
`trainer.main` in N local processes. One process trains in this process; several go through
torchrun (one node; multi-node launch is the cluster tools' job)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from trainer.config import RunConfig
from trainer.configio import dump_yaml, read_run_config
from trainer.errors import TrainError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_run_dir(cfg: RunConfig, run_dir: Path, world: int) -> Path:
    """Lay the run out for `world` processes and save it, before any process starts. An existing
    run dir is resumed, but only with the same model."""
    cfg = cfg.for_world(world)
    # Absolute data path: the run dir must mean the same thing from any working directory.
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        raise TrainError(f"data.path: {cfg.data.path} has no manifest.json (run `pretrain data run` first, or "
                         f"--set data.path=DIR)")
    path = run_dir / "config.yaml"
    if path.is_file():
        previous = read_run_config(path)
        if previous.model != cfg.model:
            raise TrainError(f"{run_dir}: holds a run of a different model ({previous.model.name}); "
                             "use another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg))
    return run_dir


def launch(run_dir: Path, nproc: int) -> int:
    if nproc == 1:
        from trainer.main import train

        return train(run_dir)
    cmd = [sys.executable, "-m", "trainer.torchrun", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "trainer.main", str(run_dir)]
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    # torchrun would set 1 thread per process, with a banner; share the cores out instead (1 on 2 cores x 2 ranks).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
