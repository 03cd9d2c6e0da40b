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
# Every process this session starts inherits the mark (Ray's daemons and workers too), so cleanup
# stops only this session's Ray, never another user's cluster or benchmark on the same machine.
SESSION_MARK = os.environ.setdefault("PRETRAIN_TEST_SESSION", uuid.uuid4().hex)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"sample data not found at {SHARED_DATA}: check out ../shared beside the repo "
                    "or set PRETRAIN_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# Session fixtures that train a model: a test that uses one is slow whatever its own body costs, so the
# quick subset (`-m "not slow"`) trains nothing.
TRAINED_RUN_FIXTURES = {"dense_run", "gpt_run", "straight", "killed_after_checkpoint"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def ray_processes() -> dict[int, psutil.Process]:
    """This test session's Ray processes, by pid (agents rename themselves ray::...)."""
    found = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (proc.info["name"] or "").startswith("ray::") or any(
                s in cmd for s in ("ray.util.client.server", "raylet", "gcs_server", "/ray/")):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("PRETRAIN_TEST_SESSION") == SESSION_MARK:
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
