"""Executors run a function over a list of items and return the results in item order.
Steps and stages know nothing about them: the local one serves tests and `data run --local`,
the Ray one runs tasks across a machine or a cluster, with retries when a worker dies."""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


class LocalExecutor:
    """In this process, one item at a time."""

    def __init__(self, show_progress: bool = False):
        self.show_progress = show_progress

    def map(self, fn: Callable, items: Sequence, *args, desc: str = "") -> list:
        with progress_bar(self.show_progress) as bar:
            task = bar.add_task(desc, total=len(items))
            results = []
            for item in items:
                results.append(fn(item, *args))
                bar.advance(task)
        return results

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray tasks; starts a local Ray in-process unless `address` names a running cluster.
    Task retries cover dead workers (a kill, an OOM); input errors come back as results."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 3,
                 show_progress: bool = True):
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.ray, self.max_retries, self.show_progress = ray, max_retries, show_progress
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            # "local" starts a fresh Ray even when the machine has another one (or a stale
            # ray_current_cluster file) that a bare ray.init() would try to join.
            kwargs = {"address": address} if address else {"address": "local", "num_cpus": num_cpus,
                                                            "include_dashboard": False}
            if address:
                check_reachable(address)
                use_ray_token_rule()
            ray.init(configure_logging=False, **kwargs)

    def map(self, fn: Callable, items: Sequence, *args, desc: str = "") -> list:
        remote = self.ray.remote(max_retries=self.max_retries)(fn)
        shared = [self.ray.put(a) for a in args]
        refs = [remote.remote(item, *shared) for item in items]
        pending = list(refs)
        with progress_bar(self.show_progress) as bar:
            task = bar.add_task(desc, total=len(refs))
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                bar.advance(task, len(done))
        return self.ray.get(refs)

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuses at once a host:port nobody listens on: ray.init would retry it for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", ray:// client addresses: Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PipelineError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}). Check that it "
                            f"is running (`ray status --address {address}`), or leave --address out to start a "
                            "local one") from None


def use_ray_token_rule() -> None:
    """Ray >= 2.5x turns on token authentication for a cluster started while a token exists
    (~/.ray/auth_token, RAY_AUTH_TOKEN) and RAY_AUTH_MODE is unset; its clients only send the token
    when told to. Apply the same rule `ray start` applies, so a client matches the cluster it joins."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
