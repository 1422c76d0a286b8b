"""A local cluster: ``forkyard up/down/status``, and the ``server``/``worker`` processes.

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
from typing import Annotated, Any

import typer

from forkyard.cli._options import HomeOpt, JsonOpt, home_dir, interactive
from forkyard.cli._output import (
    console,
    human_bytes,
    print_json,
    say,
    short,
    steps,
    table,
    when,
)
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
    "ClusterStatus",
    "cluster_status",
    "register",
    "start_cluster",
    "stop_cluster",
]

TlsCertOpt = Annotated[Path | None, typer.Option(
    "--tls-cert", envvar="FORKYARD_TLS_CERT", help="Serve HTTPS with this PEM certificate.")]
TlsKeyOpt = Annotated[Path | None, typer.Option(
    "--tls-key", envvar="FORKYARD_TLS_KEY", help="The certificate's private key (PEM).")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", envvar="FORKYARD_CA", help="CA bundle (PEM) the peers' certificates are "
    "checked against (default: the system's).")]

_SERVER_START_TIMEOUT = 60.0
# A worker's first start may set the host up and build its base image.
_REGISTER_TIMEOUT = 600.0
_STOP_TIMEOUT = 30.0


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
    timeout: float = _REGISTER_TIMEOUT,
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
            _stop(existing, timeout=_STOP_TIMEOUT, say=say)
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
                _stop(cluster, timeout=_STOP_TIMEOUT, say=say)
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


def stop_cluster(home: Path, *, timeout: float = _STOP_TIMEOUT,
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


def up(
    home: HomeOpt = None,
    workers: Annotated[int, typer.Option("--workers", "-n", min=1, max=64,
                                         help="Worker daemons to start.")] = 2,
    stock_bases: Annotated[bool, typer.Option(
        "--stock-bases", help="Each worker builds its own non-reproducible base image "
        "(bases then differ between workers, as on separately provisioned hosts).")] = False,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: SQLite in "
                                           "<home>/control).")] = None,
    store: Annotated[str | None, typer.Option(
        "--store", help="Object store URL shared by the workers (default: "
        "file://<home>/store).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the "
                                           "workers to register.")] = _REGISTER_TIMEOUT,
    json_: JsonOpt = False,
) -> None:
    """Start a control plane and N worker daemons in the background (idempotent)."""
    root = home_dir(home)
    with steps(enabled=interactive() and not json_) as step:
        cluster, started = start_cluster(root, workers=workers, stock_bases=stock_bases,
                                         db=db, store=store, say=step, timeout=timeout)
    if json_:
        print_json({"started": started, "home": str(root), "url": cluster.url,
                    "api_token": cluster.api_token,
                    "workers": [w.name for w in cluster.workers], "store": cluster.store})
        return
    out = console()
    if not started:
        out.print(f"a cluster is already running in {root}")
        if len(cluster.workers) != workers:
            out.print(f"[yellow]it has {len(cluster.workers)} worker(s), not {workers}; "
                      "`forkyard down` first to change that[/yellow]")
    else:
        out.print(f"[green]cluster started[/green] in {root}")
    out.print(f"  API      {cluster.url}")
    out.print(f"  token    {cluster.api_token}")
    out.print(f"  workers  {', '.join(w.name for w in cluster.workers)}")
    out.print(f"  store    {cluster.store}")
    out.print(f"  logs     {root / 'logs'}")
    out.print(f"forkyard commands with --home {root} (or FORKYARD_HOME) find it; stop it "
              "with `forkyard down`.")


def down(
    home: HomeOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait after SIGTERM "
                                           "before SIGKILL.")] = _STOP_TIMEOUT,
) -> None:
    """Stop every process `forkyard up` started (SIGTERM, then SIGKILL)."""
    root = home_dir(home)
    cluster = stop_cluster(root, timeout=timeout, say=say)
    if cluster is None:
        console().print(f"no cluster in {root}")
        return
    console().print(f"cluster in {root} stopped")


def status(home: HomeOpt = None, json_: JsonOpt = False) -> None:
    """Show the cluster of --home: processes, workers, sandboxes.  Exit 3 if not running."""
    root = home_dir(home)
    st = cluster_status(root)
    if json_:
        print_json(st.to_json())
    else:
        _print_status(root, st)
    if st.state != "running":
        raise typer.Exit(3)


def _print_status(root: Path, st: ClusterStatus) -> None:
    out = console()
    colour = {"running": "green", "degraded": "yellow"}.get(st.state, "red")
    out.print(f"cluster in {root}: [{colour}]{st.state}[/{colour}]")
    c = st.cluster
    if c is None:
        out.print("start one with `forkyard up`")
        return
    out.print(f"  API  {c.url or '-'}   store {c.store}")
    if st.error:
        out.print(f"  [red]{st.error}[/red]")
    procs = table("process", "pid", "alive")
    for name, ok in st.processes.items():
        procs.add_row(name, str(c.pids.get(name, "-")), "yes" if ok else "[red]no[/red]")
    out.print(procs)
    if st.workers:
        t = table("worker", "state", "running", "free memory", "bases", "checkpoints",
                  "last heartbeat")
        for w in st.workers:
            t.add_row(w.name, w.state, str(w.running), human_bytes(
                None if w.free_memory_mb is None else w.free_memory_mb * 1024 * 1024),
                ", ".join(short(b, 8) for b in w.cached_bases) or "-",
                str(len(w.checkpoints)), when(w.last_heartbeat))
        out.print(t)
    if st.sandboxes is not None:
        out.print(f"sandboxes: {st.sandboxes}")


def server(
    home: Annotated[Path, typer.Option("--home", help="The control plane's own home "
                                       "(database, state).")],
    api_token: Annotated[str, typer.Option("--api-token", envvar="FORKYARD_API_TOKEN",
                                           show_default=False)],
    worker_token: Annotated[str, typer.Option("--worker-token",
                                              envvar="FORKYARD_WORKER_TOKEN",
                                              show_default=False)],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0 picks a free port.")] = 0,
    db: Annotated[str | None, typer.Option("--db", help="Database URL (default: SQLite in "
                                           "--home).")] = None,
    store: Annotated[str | None, typer.Option("--store", envvar="FORKYARD_STORE",
                                              help="Object store URL.")] = None,
    heartbeat_timeout: Annotated[float, typer.Option("--heartbeat-timeout")] = 10.0,
    ready_file: Annotated[Path | None, typer.Option("--ready-file", help="Write "
                                                    "{\"url\": ...} here once listening.")]
    = None,
    webhook_url: Annotated[str | None, typer.Option(
        "--webhook-url", envvar="FORKYARD_WEBHOOK_URL",
        help="POST every lifecycle event there (signed).")] = None,
    webhook_secret: Annotated[str | None, typer.Option(
        "--webhook-secret", envvar="FORKYARD_WEBHOOK_SECRET", show_default=False,
        help="HMAC-SHA256 key of X-Forkyard-Signature.")] = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Run the control plane in the foreground (what `forkyard up` starts).

    --api-token becomes the admin key named `admin`; --worker-token is the
    cluster secret workers' credentials derive from (`forkyard keys worker`).
    """
    from forkyard.config import Home
    from forkyard.control.server import serve

    root = home.absolute()
    serve(root, host=host, port=port, db_url=db, api_token=api_token,
          worker_token=worker_token, store_url=store or Home.at(root).default_store_url(),
          heartbeat_timeout=heartbeat_timeout, ready_file=ready_file,
          webhook_url=webhook_url, webhook_secret=webhook_secret,
          tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)


def worker(
    home: Annotated[Path, typer.Option("--home", help="The worker's own forkyard home.")],
    name: Annotated[str, typer.Option("--name")],
    server_url: Annotated[str, typer.Option(
        "--server-url", envvar="FORKYARD_SERVER_URL",
        help="The control plane's URL; several (comma-separated) for control planes "
             "sharing one PostgreSQL database: the active one is found.")],
    worker_token: Annotated[str, typer.Option("--worker-token",
                                              envvar="FORKYARD_WORKER_TOKEN",
                                              show_default=False)],
    store: Annotated[str | None, typer.Option("--store", envvar="FORKYARD_STORE",
                                              help="Object store URL (shared).")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0 picks a free port.")] = 0,
    stock_bases: Annotated[bool, typer.Option("--stock-bases")] = False,
    max_sandboxes: Annotated[int, typer.Option("--max-sandboxes", min=1)] = 32,
    on_shutdown: Annotated[str, typer.Option("--on-shutdown",
                                             help="destroy or hibernate")] = "destroy",
    ready_file: Annotated[Path | None, typer.Option("--ready-file")] = None,
    memory_mb: Annotated[int | None, typer.Option(
        "--memory-mb", min=0, help="Memory guests may hold in all, MiB (per-VM overhead "
                                   "included; default: the host's less 1 GiB).")] = None,
    cpus: Annotated[int | None, typer.Option(
        "--cpus", min=1, help="vCPUs guests may hold in all (default: 16 per core).")] = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Run a worker daemon in the foreground (what `forkyard up` starts).

    --worker-token is this worker's own credential (`forkyard keys worker NAME`).
    """
    from forkyard.config import Home
    from forkyard.worker.daemon import serve

    root = home.absolute()
    serve(root, name=name, server_url=server_url, worker_token=worker_token,
          store_url=store or Home.at(root).default_store_url(), host=host, port=port,
          stock_base=stock_bases, max_sandboxes=max_sandboxes, on_shutdown=on_shutdown,
          ready_file=ready_file, memory_mb=memory_mb, cpus=cpus, tls_cert=tls_cert,
          tls_key=tls_key, tls_ca=tls_ca)


def register(app: typer.Typer) -> None:
    from forkyard.cli import _keys

    _keys.register(app)
    app.command(rich_help_panel="Cluster")(up)
    app.command(rich_help_panel="Cluster")(down)
    app.command(rich_help_panel="Cluster")(status)
    app.command(rich_help_panel="Processes")(server)
    app.command(rich_help_panel="Processes")(worker)
