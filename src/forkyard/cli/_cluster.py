"""A local cluster: starting, stopping and reading the processes of ``forkyard up``.

The commands (``up``, ``down``, ``status``, ``server``, ``worker``) are in
``forkyard.cli._cluster_cmds``.

``up`` lays a cluster home out as::

    cluster.json         url, tokens, pids (see forkyard.sdk.cluster), mode 0600
    control/             the control plane's home (its SQLite database)
    workers/<name>/      one forkyard home per worker daemon
    store/               the shared object store (file://), unless --store
    logs/<name>.log      stdout+stderr of each process
    run/<name>.ready     {"url": ...} written by each process once it listens
"""

from __future__ import annotations

import contextlib
import fcntl
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkyard.cli._procs import (
    ClusterError,
    alive,
    died,
    python_argv,
    qemu_pids,
    spawn,
    stop_processes,
    wait_ready_file,
)
from forkyard.sdk import _ops
from forkyard.sdk._http import SyncHTTP
from forkyard.sdk.cluster import ClusterFile, WorkerRecord, load_cluster, proc_start_time
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import APIError
from forkyard.sdk.models import WorkerInfo

__all__ = [
    "REGISTER_TIMEOUT",
    "STOP_TIMEOUT",
    "ClusterStatus",
    "cluster_status",
    "start_cluster",
    "stop_cluster",
]

_SERVER_START_TIMEOUT = 60.0
# A worker's first start may set the host up and build its base image.
REGISTER_TIMEOUT = 600.0
STOP_TIMEOUT = 30.0


@contextlib.contextmanager
def _cluster_lock(home: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per home (two ups would start two clusters)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".cluster.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _procs(cluster: ClusterFile) -> dict[str, tuple[int, int]]:
    return {name: (pid, cluster.proc_start.get(name, -1)) for name, pid in cluster.pids.items()}


def _http(cluster: ClusterFile, timeout: float = 5.0) -> SyncHTTP:
    if cluster.url is None:
        raise ClusterError(f"the cluster in {cluster.home} has no URL yet")
    return SyncHTTP(ConnectionConfig(cluster.url, cluster.api_token, request_timeout=timeout))


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    cluster: ClusterFile | None
    processes: dict[str, bool]  # name → alive
    healthy: bool  # the control plane answered /health
    workers: list[WorkerInfo]
    sandboxes: int | None
    error: str | None = None

    @property
    def state(self) -> str:
        if self.cluster is None:
            return "not running"
        if self.processes and all(self.processes.values()) and self.healthy \
                and self.cluster.state == "running":
            return "running"
        if not any(self.processes.values()):
            return "stopped"
        return "degraded"

    def to_json(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "state": self.state,
            "home": None if c is None else str(c.home),
            "url": None if c is None else c.url,
            "store": None if c is None else c.store,
            "processes": {
                n: {"pid": None if c is None else c.pids.get(n), "alive": a}
                for n, a in self.processes.items()
            },
            "workers": [w.to_json() for w in self.workers],
            "sandboxes": self.sandboxes,
            "error": self.error,
        }


def cluster_status(home: Path) -> ClusterStatus:
    cluster = load_cluster(home)
    if cluster is None:
        return ClusterStatus(None, {}, False, [], None)
    processes = {n: alive(pid, start) for n, (pid, start) in _procs(cluster).items()}
    if cluster.url is None or not processes.get("server", False):
        return ClusterStatus(cluster, processes, False, [], None)
    try:
        http = _http(cluster)
        http.call(_ops.health())
        workers = http.call(_ops.list_workers())
        sandboxes = len(http.call(_ops.list_sandboxes()))
    except APIError as exc:
        return ClusterStatus(cluster, processes, False, [], None, error=str(exc))
    return ClusterStatus(cluster, processes, True, workers, sandboxes)


def start_cluster(
    home: Path,
    *,
    workers: int = 2,
    stock_bases: bool = False,
    db: str | None = None,
    store: str | None = None,
    say: Callable[[str], None] = lambda _m: None,
    timeout: float = REGISTER_TIMEOUT,
) -> tuple[ClusterFile, bool]:
    """Start a control plane and ``workers`` worker daemons in ``home``.

    Idempotent: if the cluster recorded there is running, return it with
    ``False``.  A cluster file whose processes died is cleaned up first.
    """
    if workers < 1:
        raise ClusterError("a cluster needs at least one worker")
    home = home.absolute()
    with _cluster_lock(home):
        existing = load_cluster(home)
        if existing is not None:
            status = cluster_status(home)
            if status.state == "running":
                return existing, False
            say(f"cleaning up a cluster that is {status.state}")
            _stop(existing, timeout=STOP_TIMEOUT, say=say)
        cluster = ClusterFile(
            home=home,
            api_token=secrets.token_urlsafe(32),
            worker_token=secrets.token_urlsafe(32),
            store=store or f"file://{home / 'store'}",
            db=db,
        )
        try:
            _launch(cluster, workers=workers, stock_bases=stock_bases, say=say, timeout=timeout)
        except BaseException:
            say("start failed: stopping what was started")
            with contextlib.suppress(Exception):
                _stop(cluster, timeout=STOP_TIMEOUT, say=say)
            raise
        return cluster, True


def _launch(cluster: ClusterFile, *, workers: int, stock_bases: bool,
            say: Callable[[str], None], timeout: float) -> None:
    home = cluster.home
    logs, run = home / "logs", home / "run"
    logs.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob("*.ready"):
        stale.unlink()
    from forkyard.wire.auth import worker_credential

    # the server gets the cluster secret; each worker only its own credential.
    # Tokens travel in the environment: argv is world-readable in /proc
    env = {"FORKYARD_API_TOKEN": cluster.api_token,
           "FORKYARD_WORKER_TOKEN": cluster.worker_token}

    cluster.server_home = str(home / "control")
    cluster.server_log = str(logs / "server.log")
    ready = run / "server.ready"
    argv = python_argv("server", "--home", cluster.server_home, "--store", cluster.store,
                       "--ready-file", str(ready))
    if cluster.db:
        argv += ["--db", cluster.db]
    say("starting the control plane")
    pid, start = spawn(argv, log=Path(cluster.server_log), env=env)
    cluster.pids["server"], cluster.proc_start["server"] = pid, start
    cluster.save()  # from here on `down` can clean up whatever happens next
    info = wait_ready_file(ready, pid=pid, start=start, timeout=_SERVER_START_TIMEOUT,
                           what="the control plane", log=Path(cluster.server_log))
    cluster.url = str(info["url"]).rstrip("/")
    cluster.save()
    say(f"control plane listening on {cluster.url}")

    for i in range(1, workers + 1):
        name = f"w{i}"
        rec = WorkerRecord(name=name, home=str(home / "workers" / name),
                           log=str(logs / f"{name}.log"), stock_bases=stock_bases)
        argv = python_argv("worker", "--home", rec.home, "--name", name, "--server-url",
                           cluster.url, "--store", cluster.store,
                           "--ready-file", str(run / f"{name}.ready"))
        if stock_bases:
            argv.append("--stock-bases")
        say(f"starting worker {name}")
        pid, start = spawn(argv, log=Path(rec.log), env={
            "FORKYARD_WORKER_TOKEN": worker_credential(cluster.worker_token, name)})
        cluster.pids[name], cluster.proc_start[name] = pid, start
        cluster.workers.append(rec)
        cluster.save()

    _wait_registered(cluster, say=say, timeout=timeout)
    cluster.state = "running"
    cluster.save()


def _wait_registered(cluster: ClusterFile, *, say: Callable[[str], None],
                     timeout: float) -> None:
    http = _http(cluster)
    wanted = {w.name for w in cluster.workers}
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        for rec in cluster.workers:
            pid, start = cluster.pids[rec.name], cluster.proc_start[rec.name]
            if not alive(pid, start):
                raise died(f"worker {rec.name}", Path(rec.log))
        if not alive(cluster.pids["server"], cluster.proc_start["server"]):
            raise died("the control plane", Path(cluster.server_log))
        with contextlib.suppress(APIError):
            live = {w.name for w in http.call(_ops.list_workers()) if w.state == "alive"}
            for name in sorted((live & wanted) - seen):
                say(f"worker {name} registered")
            seen |= live & wanted
        if seen == wanted:
            return
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(wanted - seen))
            raise ClusterError(f"workers {missing} did not register within {timeout:g}s; "
                               f"see {cluster.home / 'logs'}")
        time.sleep(0.2)


def stop_cluster(home: Path, *, timeout: float = STOP_TIMEOUT,
                 say: Callable[[str], None] = lambda _m: None) -> ClusterFile | None:
    """Stop every process ``up`` started in ``home``; None if there was no cluster."""
    home = home.absolute()
    with _cluster_lock(home):
        cluster = load_cluster(home)
        if cluster is None:
            return None
        _stop(cluster, timeout=timeout, say=say)
        return cluster


def _stop(cluster: ClusterFile, *, timeout: float, say: Callable[[str], None]) -> None:
    procs = _procs(cluster)
    # Workers first: on SIGTERM they destroy their sandboxes, and may still
    # report to the control plane while doing so.
    workers = {n: p for n, p in procs.items() if n != "server"}
    stop_processes(workers, timeout=timeout, say=say)
    stop_processes({n: p for n, p in procs.items() if n == "server"}, timeout=timeout, say=say)
    # QEMU dies with its worker (pdeathsig); this is the proof, and the backstop.
    leftovers = qemu_pids(cluster.home / "workers")
    if leftovers:
        say(f"killing {len(leftovers)} QEMU process(es) left behind: {leftovers}")
        stop_processes({f"qemu {p}": (p, _start(p)) for p in leftovers}, timeout=5.0, say=say)
    remaining = qemu_pids(cluster.home / "workers")
    if remaining:
        raise ClusterError(f"QEMU processes of {cluster.home} survived: {remaining}")
    cluster.remove()


def _start(pid: int) -> int:
    return proc_start_time(pid) or -1


# --- commands ----------------------------------------------------------------------------
