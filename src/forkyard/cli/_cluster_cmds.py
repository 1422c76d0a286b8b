"""The cluster commands: ``forkyard up/down/status`` and the ``server``/``worker`` processes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forkyard.cli._cluster import (
    REGISTER_TIMEOUT,
    STOP_TIMEOUT,
    ClusterStatus,
    cluster_status,
    start_cluster,
    stop_cluster,
)
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

__all__ = ["register"]

TlsCertOpt = Annotated[Path | None, typer.Option(
    "--tls-cert", envvar="FORKYARD_TLS_CERT", help="Serve HTTPS with this PEM certificate.")]
TlsKeyOpt = Annotated[Path | None, typer.Option(
    "--tls-key", envvar="FORKYARD_TLS_KEY", help="The certificate's private key (PEM).")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", envvar="FORKYARD_CA", help="CA bundle (PEM) the peers' certificates are "
    "checked against (default: the system's).")]


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
                                           "workers to register.")] = REGISTER_TIMEOUT,
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
                                           "before SIGKILL.")] = STOP_TIMEOUT,
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
    public_ports: Annotated[bool, typer.Option(
        "--public-ports", help="Allow `forkyard url --public`: guest ports reachable "
                               "without a key or token.")] = False,
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
          tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, public_ports=public_ports)


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
