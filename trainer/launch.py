"""Start a run: write RUN/config.yaml (resolved) and run `trainer.main` in N local processes.
One process trains in this process; several go through torchrun (one node; multi-node launch is
the cluster tools' job)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from shard_format import MANIFEST_NAME
from trainer.config import RunConfig
from trainer.distributed import free_port
from trainer.errors import TrainError


def check_parallel(cfg: RunConfig, world: int) -> int:
    """Gradient accumulation for this world size; refuses combinations we cannot run correctly."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise TrainError("train.precision: fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    if cfg.model.moe is not None and cfg.parallel.zero_stage == 3:
        raise TrainError("parallel.zero_stage: ZeRO-3 with a MoE model is not supported: ZeRO-3 would partition "
                         "each rank's own experts over all data-parallel ranks and gather them back as if they were "
                         "replicas; use zero_stage 1 or 2 (experts are then sharded by parallel.ep_size)")
    try:
        return cfg.check_batch(world)
    except ValueError as e:
        raise TrainError(str(e)) from None


def prepare_run_dir(cfg: RunConfig, run_dir: Path, nproc: int) -> Path:
    """Validate what can be checked before any process starts, then save the resolved config.
    An existing run dir is resumed, but only with the same model."""
    check_parallel(cfg, nproc)
    # Absolute data path: the run dir must mean the same thing from any working directory.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})})
    if not (Path(cfg.data.path) / MANIFEST_NAME).is_file():
        raise TrainError(f"data.path: {cfg.data.path} has no {MANIFEST_NAME} (run `pretrain data run` first, or "
                         f"--set data.path=DIR)")
    path = run_dir / "config.yaml"
    if path.is_file():
        previous = RunConfig.model_validate(yaml.safe_load(path.read_text()))
        if previous.model != cfg.model:
            raise TrainError(f"{run_dir}: holds a run of a different model ({previous.model.name}); "
                             "use another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
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
