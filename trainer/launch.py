"""Start a run on this machine. `prepare_run_dir` lays the config out for the world size and saves
it as RUN/config.yaml (multi-node jobs call it once, through cluster/submit/prepare.py); `launch`
then starts the ranks, each `trainer.main`: one in this process, or N through torchrun.

`python -m trainer.launch ARGS` is torchrun (`torch.distributed.run`, same arguments) that reports
a rank's user error once: a rank that hits a TrainError prints `error: ...` and exits 2, and plain
torchrun would print a traceback of its own ChildFailedError under it, which reads like a crash.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from shard_format import MANIFEST_NAME
from trainer.config import RunConfig
from trainer.configio import dump_yaml, read_run_config
from trainer.distributed import free_port
from trainer.errors import TrainError
from trainer.watchdog import LAUNCHER_PID, exit_with_launcher

USER_ERROR = 2  # trainer.main's exit status for a user error


def prepare_run_dir(cfg: RunConfig, run_dir: Path, world: int) -> Path:
    """Lay the run out for `world` processes and save it, before any process starts. An existing
    run dir is resumed, but only with the same model."""
    cfg = cfg.for_world(world)
    # Absolute data path: the run dir must mean the same thing from any working directory.
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if not (Path(cfg.data.path) / MANIFEST_NAME).is_file():
        raise TrainError(f"data.path: {cfg.data.path} has no {MANIFEST_NAME} (run `pretrain data run` first, or "
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
    """Train the prepared run dir with `nproc` local processes."""
    if nproc == 1:
        from trainer.main import train

        return train(run_dir)
    cmd = [sys.executable, "-m", "trainer.launch", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "trainer.main", str(run_dir)]
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
               **{LAUNCHER_PID: str(os.getpid())})
    # torchrun would set 1 thread per process, with a banner; share the cores out instead (1 on 2 cores x 2 ranks).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def torchrun(argv: Optional[list[str]] = None) -> int:
    """torchrun's exit status, but 2 without a launcher traceback when every failed rank had a user error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if LAUNCHER_PID in os.environ:  # started by `pretrain train`: stop (and stop the ranks) when it dies
        exit_with_launcher()
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks' launcher is this agent
    try:
        run(parse_args(argv))
    except SignalException as e:  # SIGTERM/SIGINT: the agent has already stopped the ranks
        print(f"stopped by signal {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        # The agent stops the other ranks with a signal (negative exit code) once one has failed.
        if USER_ERROR in codes and all(code == USER_ERROR or code < 0 for code in codes):
            return USER_ERROR
        print(e.format_msg(), file=sys.stderr)  # each rank has already printed its own traceback
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(torchrun())
