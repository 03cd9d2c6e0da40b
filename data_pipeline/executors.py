"""Executors run a function over a list of items and return the results in item order.
Steps and stages know nothing about them: the local one serves tests and `data run --local`,
the Ray one runs tasks across a machine or a cluster, with retries when a worker dies."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
