"""The daemon's app and process: :func:`create_app` over a Worker, :func:`serve` to run one."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
import uvicorn
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from forkyard._malloc import pin_mmap_threshold
from forkyard.errors import ImageNotFound
from forkyard.image import MinimalSource, build_image
from forkyard.wire.auth import BearerAuth, BodyLimit, body_limit, client_verify, tls_options
from forkyard.wire.errors import install_error_handlers
from forkyard.wire.models import WORKER_NAME_RE
from forkyard.wire.serving import bind, setup_logging
from forkyard.worker import Worker
from forkyard.worker.daemon._capacity import host_budget
from forkyard.worker.daemon._link import HEARTBEAT_INTERVAL
from forkyard.worker.daemon._metrics import add_metrics
from forkyard.worker.daemon._node import Node, OnShutdown
from forkyard.worker.daemon._routes import add_routes

__all__ = ["create_app", "serve"]

log = logging.getLogger("forkyard.worker.daemon")

_THREADS = 256  # sync routes: every exec waiting on a guest holds one


def create_app(
    worker: Worker,
    *,
    worker_token: str,
    server_url: str | None = None,
    public_url: str | None = None,
    store_url: str | None = None,
    max_sandboxes: int = 32,
    on_shutdown: OnShutdown = "destroy",
    ready_file: Path | None = None,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    memory_mb: int | None = None,
    cpus: int | None = None,
    server_verify: ssl.SSLContext | bool = True,
) -> FastAPI:
    """The daemon's app over ``worker``.

    With ``server_url`` and ``public_url`` (the URL this app is reachable at),
    its lifespan registers with the control plane and heartbeats; its shutdown
    destroys or hibernates every sandbox and closes ``worker``.  ``memory_mb`` and
    ``cpus`` are what guests may hold in all (default: the host's, see ``_capacity``).
    """
    if not worker_token:
        raise ValueError("worker_token must not be empty")
    if on_shutdown not in ("destroy", "hibernate"):
        raise ValueError(f"on_shutdown must be 'destroy' or 'hibernate', not {on_shutdown!r}")
    if not WORKER_NAME_RE.match(worker.name):
        raise ValueError(f"bad worker name {worker.name!r} (letters, digits, '._-', ≤ 64)")
    node = Node(worker, worker_token=worker_token, server_url=server_url,
                public_url=public_url, store_url=store_url, max_sandboxes=max_sandboxes,
                on_shutdown=on_shutdown, ready_file=ready_file,
                heartbeat_interval=heartbeat_interval, budget=host_budget(memory_mb, cpus),
                server_verify=server_verify)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = _THREADS
        node.link.start()
        try:
            yield
        finally:
            await run_in_threadpool(node.shutdown)

    app = FastAPI(title=f"forkyard worker {worker.name}", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.daemon = node
    install_error_handlers(app)
    add_metrics(app, node)  # its timing middleware sits inside the token check
    app.add_middleware(BodyLimit, limit_for=body_limit)  # inside: after auth
    app.add_middleware(BearerAuth, token_for=lambda _path: worker_token)
    add_routes(app, node)
    return app


def serve(
    home: Path,
    *,
    name: str,
    server_url: str,
    worker_token: str,
    store_url: str,
    host: str = "127.0.0.1",
    port: int = 0,
    stock_base: bool = False,
    max_sandboxes: int = 32,
    on_shutdown: str = "destroy",
    ready_file: Path | None = None,
    memory_mb: int | None = None,
    cpus: int | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> None:
    """Run a worker daemon until SIGINT/SIGTERM.

    ``worker_token`` is this worker's own credential (``forkyard keys worker
    NAME``).  With ``tls_cert``/``tls_key`` it serves HTTPS; ``tls_ca`` is the
    CA bundle the control plane's certificate is checked against (default:
    the system's).

    Once registered with the control plane at ``server_url``, writes
    ``{"url": ..., "name": ...}`` to ``ready_file``.  ``stock_base`` builds
    this worker's own non-reproducible ``minimal`` image first (unless the home
    has one), as a fleet whose workers built their bases separately would.
    """
    setup_logging()
    if on_shutdown not in ("destroy", "hibernate"):
        raise ValueError(f"on_shutdown must be 'destroy' or 'hibernate', not {on_shutdown!r}")
    policy: OnShutdown = "hibernate" if on_shutdown == "hibernate" else "destroy"
    worker = Worker(Path(home).expanduser(), name=name, store=store_url,
                    log=lambda m: log.info("%s", m))
    try:
        if stock_base:
            try:
                worker.images.get("minimal")
            except ImageNotFound:
                info = build_image(worker.home, MinimalSource(), name="minimal", stock=True)
                log.info("built stock base minimal sha256:%s", info.digest[:12])
        sock, url = bind(host, port)
        tls = tls_options(tls_cert, tls_key)
        if tls:
            url = "https://" + url.removeprefix("http://")
        app = create_app(worker, worker_token=worker_token, server_url=server_url,
                         public_url=url, store_url=store_url, max_sandboxes=max_sandboxes,
                         on_shutdown=policy, ready_file=ready_file, memory_mb=memory_mb,
                         cpus=cpus, server_verify=client_verify(tls_ca))
        log.info("worker %s (pid %d) listening on %s", name, os.getpid(), url)
        pin_mmap_threshold()  # RSS follows the replies held (forkyard._malloc)
        config = uvicorn.Config(app, log_level="info", access_log=False,
                                timeout_graceful_shutdown=30, lifespan="on",
                                ssl_certfile=tls[0] if tls else None,
                                ssl_keyfile=tls[1] if tls else None)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        worker.close()  # normally done by the app's shutdown; this is the backstop
