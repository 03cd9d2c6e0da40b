"""Shared fixtures: where the sample data lives, and an environment that keeps every
real component (wandb, Ray, DeepSpeed's JIT cache) local and offline."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PRETRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process this session starts (Ray heads, their workers, ranks) inherits this: the mark that
# lets the cleanup below stop our Ray processes and never another session's on the same machine.
SESSION_VAR = "PRETRAIN_TEST_SESSION"
os.environ[SESSION_VAR] = uuid.uuid4().hex


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"sample data not found at {SHARED_DATA}: check out ../shared beside the repo "
                    "or set PRETRAIN_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def ray_processes() -> dict[int, psutil.Process]:
    """This session's Ray processes, by pid (agents rename themselves ray::...)."""
    found = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (proc.info["name"] or "").startswith("ray::") or any(
                s in cmd for s in ("ray.util.client.server", "raylet", "gcs_server", "/ray/")):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(SESSION_VAR) == os.environ[SESSION_VAR]:
                    found[proc.pid] = proc
    return found


def kill_ray_started_since(before: set[int]) -> None:
    for pid, proc in ray_processes().items():
        if pid not in before:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.fixture(scope="session", autouse=True)
def no_ray_left_behind_by_the_session():
    """ray.shutdown() and killed drivers can leave Ray's client proxy or agents running for
    minutes (re-parented, some using CPU): stop whatever Ray processes the test session started."""
    before = set(ray_processes())
    yield
    kill_ray_started_since(before)
