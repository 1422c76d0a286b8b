"""``GET /metrics`` of the control plane: Prometheus text from prometheus-client.

Counts and latency histograms of the operations are kept as they happen;
gauges of the fleet (sandboxes by state, per-worker load, bytes stored) are
read from the database at scrape time, so they are never stale and cost
nothing between scrapes.  Each app has its own registry (tests run several
control planes in one process).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from forkyard.control._db import ArchiveRow, Database, SandboxRow, WorkerRow
from forkyard.wire.lifecycle import SandboxState

__all__ = ["CONTENT_TYPE", "Metrics", "timed"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPERATIONS = ("create", "fork", "checkpoint", "publish", "hibernate", "wake")
# boots under TCG take seconds, forks a fraction of one, publishes up to minutes
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
_ACTIVE = (SandboxState.STARTING, SandboxState.RUNNING, SandboxState.WAKING,
           SandboxState.HIBERNATING)

P = ParamSpec("P")
R = TypeVar("R")


class _Fleet(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily("forkyard_sandboxes", "Sandboxes by state", labels=["state"])
        per = {name: GaugeMetricFamily(f"forkyard_worker_{name}", doc, labels=["worker"])
               for name, doc in (
                   ("sandboxes", "Sandboxes occupying a VM on the worker"),
                   ("sandbox_slots_free", "More sandboxes the worker may take"),
                   ("memory_in_use_mb", "Memory of the worker's sandboxes (MiB)"),
                   ("memory_free_mb", "Free memory the worker last reported (MiB)"),
                   ("cpus_in_use", "vCPUs of the worker's sandboxes"),
                   ("alive", "1 if the worker is alive"))}
        stored = GaugeMetricFamily("forkyard_stored_bytes",
                                   "Bytes of published checkpoints in the store")
        with self.db.tx() as s:
            counts = dict(s.execute(select(SandboxRow.state, func.count())
                                    .group_by(SandboxRow.state)).all())
            load = {w: (n, mem or 0, cpu or 0) for w, n, mem, cpu in s.execute(
                select(SandboxRow.worker, func.count(), func.sum(SandboxRow.memory_mb),
                       func.sum(SandboxRow.cpus))
                .where(SandboxRow.state.in_(_ACTIVE)).group_by(SandboxRow.worker))}
            workers = [(w.name, w.state, w.free_memory_mb, w.max_sandboxes)
                       for w in s.scalars(select(WorkerRow))]
            total = s.scalar(select(func.sum(ArchiveRow.stored_bytes))) or 0
        for state in SandboxState:
            states.add_metric([state.value], counts.get(state.value, 0))
        for name, wstate, free_mb, max_sb in workers:
            n, mem, cpu = load.get(name, (0, 0, 0))
            per["sandboxes"].add_metric([name], n)
            per["sandbox_slots_free"].add_metric([name], max(0, max_sb - n))
            per["memory_in_use_mb"].add_metric([name], mem)
            per["memory_free_mb"].add_metric([name], free_mb)
            per["cpus_in_use"].add_metric([name], cpu)
            per["alive"].add_metric([name], 1 if wstate == "alive" else 0)
        stored.add_metric([], total)
        yield states
        yield from per.values()
        yield stored


class Metrics:
    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.operations = Counter("forkyard_operations", "Operations by outcome",
                                  ["operation", "outcome"], registry=self.registry)
        self.seconds = Histogram("forkyard_operation_seconds", "Latency of successful operations",
                                 ["operation"], buckets=_BUCKETS, registry=self.registry)
        self.published_bytes = Counter(
            "forkyard_published_bytes", "Bytes stored by the checkpoints published "
            "(their own parts; shared ones like bases counted once where first stored)",
            registry=self.registry)
        for op in OPERATIONS:  # every series exists from the start (rate() needs a zero)
            self.seconds.labels(op)
            for outcome in ("ok", "error"):
                self.operations.labels(op, outcome)
        self.registry.register(_Fleet(db))

    @contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.operations.labels(operation, "error").inc()
            raise
        self.operations.labels(operation, "ok").inc()
        self.seconds.labels(operation).observe(time.monotonic() - started)

    def observe(self, operation: str, seconds: float, ok: bool) -> None:
        self.operations.labels(operation, "ok" if ok else "error").inc()
        if ok:
            self.seconds.labels(operation).observe(seconds)

    def published(self, stored_bytes: int | None) -> None:
        if stored_bytes:
            self.published_bytes.inc(stored_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def timed(operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Count and time a plane method (its ``self.metrics``)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            metrics: Any = getattr(args[0], "metrics")  # noqa: B009
            with metrics.timed(operation):
                return fn(*args, **kwargs)
        return run
    return wrap
