"""No orphans: SIGKILL of `pretrain train --nproc 2`, the top of pretrain -> torchrun agent -> ranks,
ends every process below it within seconds, and the ranks checkpoint on their way out."""
import subprocess
import sys
import time

import psutil
import pytest

from tests.trainer.conftest import REPO, child_env
from trainer import testing_hooks

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_pretrain_train_stops_the_agent_and_every_rank(shard_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cluster.cli", "train", str(REPO / "configs/train/tiny-gpt-cpu.yaml"), "--nproc", "2",
           "--run-dir", str(run), "--set", f"data.path={shard_dir}", "--set", "logging.wandb_mode=disabled"]
    top = subprocess.Popen(cmd, env={**child_env(), testing_hooks.STEP_DELAY_S: "0.5"}, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert top.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "the ranks never logged a step"
            time.sleep(0.2)
        tree = psutil.Process(top.pid).children(recursive=True)
        ranks = [p for p in tree if "trainer.main" in p.cmdline() and "trainer.launch" not in p.cmdline()]
        assert len(ranks) == 2 and len(tree) > len(ranks)  # the ranks, and the torchrun agent above them
        top.kill()
        top.wait()
        deadline = time.monotonic() + 15
        while any(map(running, tree)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p.pid for p in tree if running(p)], "processes outlived the killed `pretrain train`"
        # They stopped by SIGTERM, as a stopped job does: a checkpoint of where they were.
        assert (run / "checkpoints" / "latest").is_file()
    finally:
        for p in tree:
            if running(p):
                p.kill()
