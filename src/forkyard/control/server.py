"""The control plane: ``forkyard server``.

:func:`create_app` builds the FastAPI app (tests run it in-process);
:func:`serve` runs it with uvicorn until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

import forkyard
from forkyard._malloc import pin_mmap_threshold
from forkyard.control._db import Database
from forkyard.control._keys import Keys
from forkyard.control._leader import StandbyGate
from forkyard.control._routes import add_routes
from forkyard.control._service import ControlPlane
from forkyard.control._workers import WorkerClients
from forkyard.wire.auth import (
    BodyLimit,
    KeyAuth,
    Principal,
    RateLimiter,
    body_limit,
    client_verify,
    tls_options,
    worker_credential,
    worker_of,
)
from forkyard.wire.errors import install_error_handlers
from forkyard.wire.serving import bind, setup_logging, write_ready_file

__all__ = ["create_app", "serve"]

log = logging.getLogger("forkyard.control")

_THREADS = 100  # sync routes (create/fork/wake wait for a boot) share this pool
RATE = 200.0  # requests per second and key, sustained ...
BURST = 1000  # ... and at once


def create_app(
    *,
    db_url: str,
    api_token: str,
    worker_token: str,
    store_url: str,
    heartbeat_timeout: float = 10.0,
    on_ready: Callable[[], None] | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    rate: float | None = RATE,
    burst: int = BURST,
    worker_verify: ssl.SSLContext | bool = True,
) -> FastAPI:
    """The control-plane app; the database is migrated to the newest schema here.

    ``api_token`` becomes (or stays) the admin key named ``admin``; more keys
    are made through ``/v1/keys``.  ``worker_token`` is the cluster secret every
    worker's credential is derived from (:func:`worker_credential`); it never
    goes to a worker itself.  ``rate``/``burst``: the per-key rate limit (None:
    none).  ``worker_verify``: how workers' TLS certificates are checked.

    Its lifespan starts the liveness monitor and resumes work a previous run
    left open; ``app.state.plane`` is the :class:`ControlPlane` behind it.
    """
    if not api_token or not worker_token:
        raise ValueError("api_token and worker_token must not be empty")
    if api_token == worker_token:
        # a worker could then act as a user and the other way round
        raise ValueError("api_token and worker_token must differ")
    if heartbeat_timeout <= 0:
        raise ValueError("heartbeat_timeout must be positive")
    db = Database(db_url)
    db.migrate()
    clients = WorkerClients(lambda name: worker_credential(worker_token, name),
                            verify=worker_verify)
    plane = ControlPlane(db, clients, store_url=store_url, heartbeat_timeout=heartbeat_timeout)
    # every event is POSTed there, signed with the secret (docs/api.md, "Events")
    plane.events.configure_webhook(webhook_url, webhook_secret)
    keys: Keys = plane.keys
    keys.bootstrap(api_token)

    def resolve(path: str, token: str) -> Principal | None:
        # each kind of credential opens only its own half of the API
        if path.startswith("/internal/"):
            name = worker_of(worker_token, token)
            return Principal(name, "worker") if name is not None else None
        return keys.principal(token)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = _THREADS
        plane.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            plane.stop()
            clients.close()
            db.close()

    app = FastAPI(
        title="forkyard control plane",
        version=forkyard.__version__,
        summary="Checkpoint, fork, hibernate and wake QEMU sandboxes on a fleet of workers",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.plane = plane
    install_error_handlers(app)
    add_routes(app, plane)
    # the last added runs first: no body is read before its sender is known
    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.add_middleware(KeyAuth, resolve=resolve,
                       limiter=RateLimiter(rate, burst) if rate is not None else None)
    # outermost: a standby control plane answers only /health (clients move on)
    app.add_middleware(StandbyGate, active=plane.leader.active)
    _document_auth(app)
    return app


_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def _document_auth(app: FastAPI) -> None:
    """Declare the bearer scheme in the schema (the middleware enforces it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiToken": {"type": "http", "scheme": "bearer",
                             "description": "API key (`/v1/*`)"},
                "workerToken": {"type": "http", "scheme": "bearer",
                                "description": "the worker's own credential (`/internal/*`)"},
            }
            for path, ops in schema.get("paths", {}).items():
                if path == "/health":
                    continue
                scheme = "workerToken" if path.startswith("/internal/") else "apiToken"
                for op in ops.values():
                    op["security"] = [{scheme: []}]
                    responses = op.setdefault("responses", {})
                    responses.setdefault("401", {"description": "missing or invalid bearer token"})
                    if "requestBody" in op:  # BodyLimit, before the route sees it
                        responses.setdefault("413", {"description": "a body over the limit",
                                                     "content": _ERROR_JSON})
                    if scheme == "apiToken":
                        responses.setdefault("429", {
                            "description": "this key's rate limit; retry after `Retry-After` s",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": _ERROR_JSON})
            _add_links(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_SB = "/v1/sandboxes/{sandbox_id}"
_CP = "/v1/checkpoints/{checkpoint_id}"
# OpenAPI links: which reply feeds which request (clients and stateful API
# tests follow them).  (from method, path, status) -> [(to method, path, parameters)]
_LINKS: dict[tuple[str, str, str], list[tuple[str, str, dict[str, str]]]] = {
    ("post", "/v1/sandboxes", "201"): [
        (m, path, {"sandbox_id": "$response.body#/id"}) for m, path in (
            ("get", _SB), ("delete", _SB), ("post", f"{_SB}/exec"), ("put", f"{_SB}/files"),
            ("get", f"{_SB}/files/list"), ("post", f"{_SB}/checkpoint"),
            ("post", f"{_SB}/hibernate"), ("post", f"{_SB}/wake"))
    ],
    ("put", f"{_SB}/files", "200"): [
        (m, path, {"sandbox_id": "$request.path.sandbox_id", "path": "$response.body#/path"})
        for m, path in (("get", f"{_SB}/files"), ("get", f"{_SB}/files/stat"),
                        ("delete", f"{_SB}/files"))
    ],
    ("post", f"{_SB}/checkpoint", "201"): [
        (m, path, {"checkpoint_id": "$response.body#/id"})
        for m, path in (("get", _CP), ("post", f"{_CP}/fork"), ("delete", _CP))
    ],
    ("post", f"{_CP}/fork", "201"): [
        (m, path, {"sandbox_id": "$response.body#/0/id"})
        for m, path in (("get", _SB), ("post", f"{_SB}/exec"), ("delete", _SB))
    ],
    ("post", f"{_SB}/hibernate", "200"): [
        ("post", f"{_SB}/wake", {"sandbox_id": "$response.body#/id"}),
    ],
}


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    for (method, path, status), targets in _LINKS.items():
        response = paths[path][method]["responses"][status]
        links = response.setdefault("links", {})
        for to_method, to_path, parameters in targets:
            op_id = paths[to_path][to_method]["operationId"]
            links[op_id] = {"operationId": op_id, "parameters": parameters}


def serve(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    db_url: str | None = None,
    api_token: str,
    worker_token: str,
    store_url: str,
    heartbeat_timeout: float = 10.0,
    ready_file: Path | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> None:
    """Run the control plane until SIGINT/SIGTERM.

    With ``tls_cert``/``tls_key`` it serves HTTPS only; ``tls_ca`` is the CA
    bundle workers' certificates are checked against (default: the system's).

    ``db_url`` defaults to ``sqlite:///<home>/control.db``.  Once it accepts
    requests, ``{"url": "http://HOST:PORT"}`` is written to ``ready_file``.
    """
    setup_logging()
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    sock, url = bind(host, port)
    tls = tls_options(tls_cert, tls_key)
    if tls:
        url = "https://" + url.removeprefix("http://")

    def ready() -> None:
        log.info("control plane listening on %s", url)
        if ready_file is not None:
            write_ready_file(Path(ready_file), {"url": url})

    app = create_app(
        db_url=db_url or f"sqlite:///{home / 'control.db'}",
        api_token=api_token,
        worker_token=worker_token,
        store_url=store_url,
        heartbeat_timeout=heartbeat_timeout,
        on_ready=ready,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        worker_verify=client_verify(tls_ca),
    )
    pin_mmap_threshold()  # RSS follows the replies held (forkyard._malloc)
    config = uvicorn.Config(app, log_level="info", access_log=False,
                            timeout_graceful_shutdown=30, lifespan="on",
                            ssl_certfile=tls[0] if tls else None,
                            ssl_keyfile=tls[1] if tls else None)
    uvicorn.Server(config).run(sockets=[sock])
