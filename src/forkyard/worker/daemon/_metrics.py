"""``GET /metrics`` of a worker daemon: Prometheus text from prometheus-client.

The operations are timed by a middleware that knows their routes (so the
route handlers stay as they are); the gauges -- sandboxes, memory and vCPUs
in use and free -- are read from the worker at scrape time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from forkyard.wire.lifecycle import SandboxState
from forkyard.worker.daemon._capacity import free_memory_mb
from forkyard.worker.daemon._node import Node

__all__ = ["add_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
_OPERATIONS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"^/sandboxes$"), "create"),
    ("POST", re.compile(r"^/checkpoints/[^/]+/fork$"), "fork"),
    ("POST", re.compile(r"^/sandboxes/[^/]+/checkpoint$"), "checkpoint"),
    ("POST", re.compile(r"^/sandboxes/[^/]+/hibernate$"), "hibernate"),
    ("POST", re.compile(r"^/sandboxes/[^/]+/wake$"), "wake"),
)


def _operation(method: str, path: str) -> str | None:
    for m, pattern, op in _OPERATIONS:
        if m == method and pattern.match(path):
            return op
    return None


class _Load(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        memory = cpus = running = 0
        for sb in self.node.worker.list():
            info = sb.info().to_json()
            if info.get("state") in (SandboxState.RUNNING, SandboxState.STARTING,
                                     SandboxState.PAUSED):
                running += 1
                memory += int(info.get("memory_mb") or 0)
                cpus += int(info.get("cpus") or 0)
        host_cpus = os.cpu_count() or 1
        limit = self.node.capacity.limit
        for name, doc, value in (
            ("forkyard_worker_sandboxes", "Sandboxes with a VM here", running),
            ("forkyard_worker_sandbox_slots_free", "More sandboxes this worker may take",
             max(0, limit - running)),
            ("forkyard_worker_memory_in_use_mb", "Memory of the sandboxes here (MiB)", memory),
            ("forkyard_worker_memory_free_mb", "Free host memory (MiB)", free_memory_mb()),
            ("forkyard_worker_cpus_in_use", "vCPUs of the sandboxes here", cpus),
            ("forkyard_worker_cpus_free", "Host CPUs not given to a sandbox",
             max(0, host_cpus - cpus)),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        blobs = self.node.worker.blobstore
        for name, doc, value in (
            ("forkyard_worker_store_uploaded_bytes", "Bytes sent to the object store "
             "(compressed; publishes)", blobs.uploaded_bytes),
            ("forkyard_worker_store_downloaded_bytes", "Bytes read from the object store "
             "(compressed; forks and wakes of parts not here)", blobs.downloaded_bytes),
        ):
            yield CounterMetricFamily(name, doc, value=value)


def add_metrics(app: FastAPI, node: Node) -> None:
    registry = CollectorRegistry()
    ops = Counter("forkyard_worker_operations", "Operations by outcome",
                  ["operation", "outcome"], registry=registry)
    seconds = Histogram("forkyard_worker_operation_seconds", "Latency of successful operations",
                        ["operation"], buckets=_BUCKETS, registry=registry)
    for _, _, op in _OPERATIONS:
        seconds.labels(op)
        ops.labels(op, "ok")
        ops.labels(op, "error")
    registry.register(_Load(node))

    @app.middleware("http")
    async def timing(request: Request,
                     call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        op = _operation(request.method, request.url.path)
        if op is None:
            return await call_next(request)
        started = time.monotonic()
        response = await call_next(request)
        if response.status_code == 401:
            return response  # not an operation: a caller without the token
        ok = response.status_code < 400
        ops.labels(op, "ok" if ok else "error").inc()
        if ok:
            seconds.labels(op).observe(time.monotonic() - started)
        return response

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE)
