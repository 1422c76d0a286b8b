"""The worker daemon (``forkyard worker``): one :class:`Worker` behind HTTP.

Only the control plane calls it (worker token).  It registers with the
control plane at start (retrying until it answers), then reports its capacity
and sandboxes every 2 s; the reply names sandboxes the cluster no longer knows,
which it destroys (a destroy whose call was lost, a copy left behind by a wake
on another worker).  Checkpoints are published by a background pool; the
control plane follows each publish with ``GET /checkpoints/{id}?wait=``.

On SIGTERM/SIGINT uvicorn stops accepting requests, waits for those in
flight, and the app's shutdown then destroys or hibernates (``on_shutdown``)
every sandbox and tells the control plane.  If the process dies instead, its
QEMUs die with it (``forkyard.vm._spawn``): no VM outlives its daemon.

Bodies and the error table are shared with the control plane
(``forkyard.wire.models`` / ``._errors``): one wire format, one mapping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio.to_thread
import httpx
import uvicorn
from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from forkyard.checkpoint import Checkpoint
from forkyard.errors import ForkyardError, ImageNotFound, SandboxNotFound
from forkyard.guest.client import EntryInfo, ExecResult
from forkyard.image import MinimalSource, build_image
from forkyard.wire.auth import BearerAuth
from forkyard.wire.errors import ApiError, install_error_handlers
from forkyard.wire.models import (
    WORKER_NAME_RE,
    CheckpointState,
    EntryOut,
    ExecRequest,
    ExecResultOut,
    FileWritten,
    HeartbeatReply,
    WorkerCheckpoint,
    WorkerCheckpointRequest,
    WorkerCreateRequest,
    WorkerForkRequest,
    WorkerHealth,
    WorkerHibernated,
    WorkerLeaving,
    WorkerReport,
    WorkerSandbox,
    WorkerStatus,
    WorkerWakeRequest,
)
from forkyard.wire.serving import (
    bind,
    check_length,
    limited_body,
    setup_logging,
    write_ready_file,
)
from forkyard.worker._sandbox import Sandbox, SandboxState
from forkyard.worker._worker import Worker

__all__ = ["create_app", "serve"]

log = logging.getLogger("forkyard.worker.daemon")

T = TypeVar("T")
OnShutdown = Literal["destroy", "hibernate"]

HEARTBEAT_INTERVAL = 2.0
_PUBLISH_THREADS = 2  # publishing is disk + zstd bound; more threads only thrash
_THREADS = 256  # sync routes: every exec waiting on a guest holds one
_MAX_WAIT = 30.0  # cap on GET /checkpoints/{id}?wait=
_LEAVE_TIMEOUT = 10.0
_MIN_REPORT_GAP = 0.2
# sandboxes that occupy a VM slot
_BUSY = (SandboxState.STARTING, SandboxState.RUNNING, SandboxState.PAUSED)

SandboxId = Annotated[str, PathParam(pattern=r"^sb-[0-9a-f]{20}$")]
CheckpointId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]
GuestPath = Annotated[str, Query(pattern=r"^/[^\x00]*$", max_length=4096)]


def _free_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _sandbox_json(sb: Sandbox) -> WorkerSandbox:
    return WorkerSandbox.model_validate(sb.info().to_json())


def _exec_json(r: ExecResult) -> ExecResultOut:
    return ExecResultOut(
        exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr,
        stdout_b64=base64.b64encode(r.stdout_bytes).decode(),
        stderr_b64=base64.b64encode(r.stderr_bytes).decode(),
        pid=r.pid, signal=r.signal, timed_out=r.timed_out, truncated=r.truncated,
    )


def _entry_json(e: EntryInfo) -> EntryOut:
    return EntryOut(name=e.name, mode=e.mode, size=e.size, mtime_ns=e.mtime_ns,
                    is_dir=e.is_dir)


@dataclass
class _Publish:
    """One background publish, as ``GET /checkpoints/{id}`` reports it."""

    state: CheckpointState
    stored_bytes: int | None = None
    error: str | None = None


class _Daemon:
    def __init__(
        self,
        worker: Worker,
        *,
        worker_token: str,
        server_url: str | None,
        public_url: str | None,
        store_url: str | None,
        max_sandboxes: int,
        on_shutdown: OnShutdown,
        ready_file: Path | None,
        heartbeat_interval: float,
    ) -> None:
        self.worker = worker
        self.name = worker.name
        self.token = worker_token
        self.server_url = server_url.rstrip("/") if server_url else None
        self.public_url = public_url
        self.store_url = store_url
        self.max_sandboxes = max_sandboxes
        self.on_shutdown = on_shutdown
        self.ready_file = ready_file
        self.interval = heartbeat_interval
        self._lock = threading.Lock()
        self._publishes: dict[str, _Publish] = {}
        self._pool = ThreadPoolExecutor(_PUBLISH_THREADS, thread_name_prefix="publish")
        self._reserved = 0  # VM slots promised to requests still booting
        self._stop = threading.Event()
        self._kick = threading.Event()  # report now instead of at the next tick
        self._link: threading.Thread | None = None
        self.registered = threading.Event()

    # ------------------------------------------------------------------
    # capacity
    def running(self) -> int:
        return sum(1 for sb in self.worker.list() if sb.state in _BUSY)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one VM slot for a boot, or refuse with 503 when the worker is full."""
        with self._lock:
            if self.running() + self._reserved >= self.max_sandboxes:
                raise ApiError(503, f"worker {self.name} is full "
                                    f"({self.max_sandboxes} sandboxes)")
            self._reserved += 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= 1
            self.kick()

    def status(self) -> WorkerStatus:
        images: dict[str, str] = {}
        for info in self.worker.images.list():
            for name in info.names:
                images[name] = info.digest
        return WorkerStatus(
            name=self.name, running=self.running(), free_memory_mb=_free_memory_mb(),
            max_sandboxes=self.max_sandboxes, cached_bases=self.worker.cached_bases(),
            checkpoints=self.worker.local_checkpoint_ids(), images=images,
        )

    def report(self) -> WorkerReport:
        assert self.public_url is not None
        return WorkerReport(
            **self.status().model_dump(), url=self.public_url, store_url=self.store_url,
            sandboxes=[_sandbox_json(sb) for sb in self.worker.list()],
        )

    # ------------------------------------------------------------------
    # checkpoints and publishing
    def checkpoint_json(self, cp: Checkpoint, state: CheckpointState | None = None
                        ) -> WorkerCheckpoint:
        job = self._publishes.get(cp.id)
        if state is None:
            if job is not None:
                state = job.state
            elif self.worker.checkpoints.flag(cp.id, "published") is not None:
                state = CheckpointState.PUBLISHED
            else:
                state = CheckpointState.LOCAL
        m = cp.manifest
        return WorkerCheckpoint(
            id=cp.id, sandbox=m.sandbox, name=m.name, created=m.created, base=m.base.digest,
            changed_bytes=cp.changed_bytes, state=state,
            stored_bytes=job.stored_bytes if job else None, error=job.error if job else None,
        )

    def publish_now(self, cp: Checkpoint) -> None:
        """Publish in this thread; the outcome lands in ``_publishes`` (never raises)."""
        with self._lock:
            self._publishes[cp.id] = _Publish(CheckpointState.PUBLISHING)
        try:
            report = self.worker.publish(cp)
            result = _Publish(CheckpointState.PUBLISHED, stored_bytes=report.stored_bytes)
            log.info("published %s: %d bytes stored, %d uploaded in %.1fs", cp.short_id,
                     report.stored_bytes, report.uploaded_bytes, report.seconds)
        except Exception as exc:
            log.warning("publishing %s failed: %s", cp.short_id, exc)
            result = _Publish(CheckpointState.FAILED, error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._publishes[cp.id] = result
        self.kick()  # the new local checkpoint list goes out at once

    def publish_later(self, cp: Checkpoint) -> Future[None]:
        with self._lock:
            self._publishes[cp.id] = _Publish(CheckpointState.PUBLISHING)
        return self._pool.submit(self.publish_now, cp)

    async def publish_status(self, checkpoint_id: str, wait: float) -> WorkerCheckpoint:
        """Long-poll: answer when the publish settles or ``wait`` seconds pass."""
        deadline = time.monotonic() + min(wait, _MAX_WAIT)
        while True:
            job = self._publishes.get(checkpoint_id)
            if job is None or job.state != CheckpointState.PUBLISHING:
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        cp = await run_in_threadpool(self.worker.resolve_checkpoint, checkpoint_id)
        if job is None and not self.worker.checkpoints.has(cp.id):
            return self.checkpoint_json(cp, CheckpointState.PUBLISHED)  # found in the store
        return self.checkpoint_json(cp)

    # ------------------------------------------------------------------
    # sandbox operations that are more than one library call
    def fork(self, checkpoint_id: str, sandbox_id: str | None) -> WorkerSandbox:
        """Fork; the library fetches what is not local (once, even for concurrent forks)."""
        fetched = not self.worker.checkpoints.has(checkpoint_id)
        with self.slot():
            sb = self.worker.fork(checkpoint_id, sandbox_id=sandbox_id)
        if fetched:
            self.kick()  # the control plane should know it is local here now
        return _sandbox_json(sb)

    def hibernate(self, sandbox_id: str) -> WorkerHibernated:
        sb = self.worker.get(sandbox_id)
        cp = sb.hibernate()
        self.kick()
        self.publish_now(cp)
        return WorkerHibernated(checkpoint=self.checkpoint_json(cp), sandbox=_sandbox_json(sb))

    def wake(self, sandbox_id: str, checkpoint_id: str | None) -> WorkerSandbox:
        try:
            local: Sandbox | None = self.worker.get(sandbox_id)
        except SandboxNotFound:
            local = None
        if local is not None and checkpoint_id is not None and local.state not in _BUSY:
            current = (local.state is SandboxState.HIBERNATED
                       and local.last_checkpoint == checkpoint_id)
            if not current:
                # A stale copy: the sandbox ran (and hibernated) elsewhere since, or
                # broke here.  Waking it would silently go back in time.
                log.info("dropping stale %s copy of %s", local.state.value, sandbox_id)
                local.destroy()
                local = None
        if local is None and checkpoint_id is None:
            raise ApiError(404, f"sandbox {sandbox_id} is not on worker {self.name} "
                                "and no checkpoint was given to adopt it from")
        with self.slot():
            sb = self.worker.wake(sandbox_id, checkpoint=checkpoint_id)
        return _sandbox_json(sb)

    def destroy_orphans(self, ids: list[str]) -> None:
        for sid in ids:
            try:
                sb = self.worker.get(sid)
            except SandboxNotFound:
                continue
            if sb.state is SandboxState.STARTING:
                continue  # a boot in flight is never an orphan; the next report settles it
            log.info("destroying %s: the control plane no longer has it here", sid)
            with contextlib.suppress(ForkyardError):
                sb.destroy()

    # ------------------------------------------------------------------
    # link to the control plane
    def kick(self) -> None:
        """Send a report now: the control plane should see this change without delay."""
        self._kick.set()

    def start_link(self) -> None:
        if self.server_url is None or self.public_url is None:
            return
        self._link = threading.Thread(target=self._link_loop, name="heartbeat", daemon=True)
        self._link.start()

    def _post(self, http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
        return http.post(path, json=body, timeout=httpx.Timeout(10.0, connect=3.0))

    def _link_loop(self) -> None:
        assert self.server_url is not None
        headers = {"authorization": f"Bearer {self.token}"}
        backoff = 0.2
        registered = False
        complained = 0.0
        with httpx.Client(base_url=self.server_url, headers=headers) as http:
            while not self._stop.is_set():
                path = ("/internal/workers/register" if not registered
                        else f"/internal/workers/{self.name}/heartbeat")
                self._kick.clear()  # before the report: a change made during it kicks again
                try:
                    resp = self._post(http, path, self.report().model_dump(mode="json"))
                    if resp.status_code == 404 and registered:
                        registered = False  # the control plane forgot us: start over
                        continue
                    if resp.status_code >= 400:
                        raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")
                    reply = HeartbeatReply.model_validate(resp.json())
                    if not registered:
                        registered = True
                        log.info("registered with %s as %s", self.server_url, self.name)
                        self._on_registered()
                    backoff = 0.2
                    self.destroy_orphans(reply.destroy)
                    wait = self.interval
                except Exception as exc:
                    now = time.monotonic()
                    if now - complained > 10.0:  # a down server is not worth a log flood
                        log.warning("%s %s failed: %s", "heartbeat" if registered
                                    else "registration", self.server_url, exc)
                        complained = now
                    wait = backoff
                    backoff = min(backoff * 2, self.interval)
                sent = time.monotonic()
                self._kick.wait(wait)
                # a burst of changes (fork count=32) makes one report, not 32
                self._stop.wait(max(0.0, _MIN_REPORT_GAP - (time.monotonic() - sent)))

    def _on_registered(self) -> None:
        if self.ready_file is not None and not self.registered.is_set():
            write_ready_file(self.ready_file, {"url": self.public_url, "name": self.name})
        self.registered.set()

    # ------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leave no VM behind: destroy or hibernate every sandbox, then tell the server."""
        self._stop.set()
        self._kick.set()
        if self._link is not None:
            self._link.join(timeout=15.0)
        hibernated: list[WorkerCheckpoint] = []
        busy = [sb for sb in self.worker.list() if sb.state in _BUSY]
        if self.on_shutdown == "hibernate":
            with ThreadPoolExecutor(4, thread_name_prefix="shutdown") as pool:
                for res in pool.map(self._hibernate_quietly, busy):
                    if res is not None:
                        hibernated.append(res.checkpoint)
        else:
            for sb in busy:
                with contextlib.suppress(Exception):
                    sb.destroy()
        self._pool.shutdown(wait=True)  # publishes in flight finish: they may be needed
        self._leave(hibernated)
        self.worker.close()

    def _hibernate_quietly(self, sb: Sandbox) -> WorkerHibernated | None:
        try:
            return self.hibernate(sb.id)
        except Exception as exc:
            log.warning("hibernating %s at shutdown failed (%s); destroying it", sb.id, exc)
            with contextlib.suppress(Exception):
                sb.destroy()
            return None

    def _leave(self, checkpoints: list[WorkerCheckpoint]) -> None:
        if self.server_url is None or not self.registered.is_set():
            return
        body = WorkerLeaving(sandboxes=[_sandbox_json(sb) for sb in self.worker.list()],
                             checkpoints=checkpoints)
        try:
            httpx.post(f"{self.server_url}/internal/workers/{self.name}/leave",
                       json=body.model_dump(mode="json"), timeout=_LEAVE_TIMEOUT,
                       headers={"authorization": f"Bearer {self.token}"}).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not tell the control plane we are leaving: %s", exc)


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
) -> FastAPI:
    """The daemon's app over ``worker``.

    With ``server_url`` and ``public_url`` (the URL this app is reachable at),
    its lifespan registers with the control plane and heartbeats; its shutdown
    destroys or hibernates every sandbox and closes ``worker``.
    """
    if not worker_token:
        raise ValueError("worker_token must not be empty")
    if on_shutdown not in ("destroy", "hibernate"):
        raise ValueError(f"on_shutdown must be 'destroy' or 'hibernate', not {on_shutdown!r}")
    if not WORKER_NAME_RE.match(worker.name):
        raise ValueError(f"bad worker name {worker.name!r} (letters, digits, '._-', ≤ 64)")
    d = _Daemon(worker, worker_token=worker_token, server_url=server_url,
                public_url=public_url, store_url=store_url, max_sandboxes=max_sandboxes,
                on_shutdown=on_shutdown, ready_file=ready_file,
                heartbeat_interval=heartbeat_interval)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = _THREADS
        d.start_link()
        try:
            yield
        finally:
            await run_in_threadpool(d.shutdown)

    app = FastAPI(title=f"forkyard worker {worker.name}", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.daemon = d
    install_error_handlers(app)
    app.add_middleware(BearerAuth, token_for=lambda _path: worker_token)
    _add_routes(app, d)
    return app


def _add_routes(app: FastAPI, d: _Daemon) -> None:
    w = d.worker

    async def threaded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    @app.get("/health")
    def health() -> WorkerHealth:
        return WorkerHealth(status="ok", name=d.name)

    @app.get("/status")
    def status() -> WorkerStatus:
        return d.status()

    @app.post("/sandboxes", status_code=201)
    def create(req: WorkerCreateRequest) -> WorkerSandbox:
        with d.slot():
            sb = w.create(req.image, memory_mb=req.memory_mb, cpus=req.cpus,
                          sandbox_id=req.sandbox_id)
        return _sandbox_json(sb)

    @app.get("/sandboxes")
    def list_sandboxes() -> list[WorkerSandbox]:
        return [_sandbox_json(sb) for sb in w.list()]

    @app.get("/sandboxes/{sandbox_id}")
    def get_sandbox(sandbox_id: SandboxId) -> WorkerSandbox:
        return _sandbox_json(w.get(sandbox_id))

    @app.delete("/sandboxes/{sandbox_id}", status_code=204)
    def destroy(sandbox_id: SandboxId) -> Response:
        w.get(sandbox_id).destroy()
        d.kick()
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/exec")
    def exec_in(sandbox_id: SandboxId, req: ExecRequest) -> ExecResultOut:
        r = w.get(sandbox_id).exec(req.cmd, env=req.env, cwd=req.cwd,
                                   timeout=req.effective_timeout, stdin=req.stdin_bytes(),
                                   background=req.background)
        return _exec_json(r)

    @app.put("/sandboxes/{sandbox_id}/files", status_code=200)
    async def write_file(sandbox_id: SandboxId, request: Request, path: GuestPath,
                         mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
                         append: bool = False) -> FileWritten:
        check_length(request)
        sb = w.get(sandbox_id)
        data = b"".join([chunk async for chunk in limited_body(request)])
        size = await threaded(sb.files.write, path, data, mode=mode, append=append)
        return FileWritten(path=path, size=size)

    @app.get("/sandboxes/{sandbox_id}/files")
    def read_file(sandbox_id: SandboxId, path: GuestPath) -> Response:
        data = w.get(sandbox_id).files.read(path)
        return Response(data, media_type="application/octet-stream")

    @app.get("/sandboxes/{sandbox_id}/files/list")
    def list_files(sandbox_id: SandboxId, path: GuestPath) -> list[EntryOut]:
        return [_entry_json(e) for e in w.get(sandbox_id).files.list(path)]

    @app.get("/sandboxes/{sandbox_id}/files/stat")
    def stat_file(sandbox_id: SandboxId, path: GuestPath) -> EntryOut:
        return _entry_json(w.get(sandbox_id).files.stat(path))

    @app.delete("/sandboxes/{sandbox_id}/files", status_code=204)
    def remove_file(sandbox_id: SandboxId, path: GuestPath, recursive: bool = False) -> Response:
        w.get(sandbox_id).files.remove(path, recursive=recursive)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/checkpoint", status_code=201)
    def checkpoint(sandbox_id: SandboxId,
                   req: WorkerCheckpointRequest | None = None) -> WorkerCheckpoint:
        req = req or WorkerCheckpointRequest()
        cp = w.get(sandbox_id).checkpoint(name=req.name)
        if req.publish:
            d.publish_later(cp)
        d.kick()
        return d.checkpoint_json(cp)

    @app.get("/checkpoints/{checkpoint_id}")
    async def checkpoint_status(
        checkpoint_id: CheckpointId,
        wait: Annotated[float, Query(ge=0, le=_MAX_WAIT)] = 0.0,
    ) -> WorkerCheckpoint:
        return await d.publish_status(checkpoint_id, wait)

    @app.post("/checkpoints/{checkpoint_id}/fork", status_code=201)
    def fork(checkpoint_id: CheckpointId, req: WorkerForkRequest | None = None) -> WorkerSandbox:
        return d.fork(checkpoint_id, (req or WorkerForkRequest()).sandbox_id)

    @app.post("/sandboxes/{sandbox_id}/hibernate")
    def hibernate(sandbox_id: SandboxId) -> WorkerHibernated:
        return d.hibernate(sandbox_id)

    @app.post("/sandboxes/{sandbox_id}/wake")
    def wake(sandbox_id: SandboxId, req: WorkerWakeRequest | None = None) -> WorkerSandbox:
        return d.wake(sandbox_id, (req or WorkerWakeRequest()).checkpoint_id)


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
) -> None:
    """Run a worker daemon until SIGINT/SIGTERM.

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
        app = create_app(worker, worker_token=worker_token, server_url=server_url,
                         public_url=url, store_url=store_url, max_sandboxes=max_sandboxes,
                         on_shutdown=policy, ready_file=ready_file)
        log.info("worker %s (pid %d) listening on %s", name, os.getpid(), url)
        config = uvicorn.Config(app, log_level="info", access_log=False,
                                timeout_graceful_shutdown=30, lifespan="on")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        worker.close()  # normally done by the app's shutdown; this is the backstop
