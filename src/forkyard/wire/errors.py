"""The one table from errors to HTTP status + error body (docs/api.md, "Errors").

Both services (control plane and worker daemon) install these handlers, so a
worker's error reply already has the final status and body: the control plane
relays it unchanged (:class:`WorkerReply`).  Anything that is not in the table
is a bug and becomes ``500 internal``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from forkyard.errors import (
    AgentError,
    AgentTimeout,
    BadWorkerReport,
    CheckpointNotFound,
    CommandTimeout,
    DatabaseUnavailable,
    Forbidden,
    ForkyardError,
    GuestError,
    GuestFileNotFound,
    ImageNotFound,
    IncompatibleCheckpoint,
    InsufficientCapacity,
    IntegrityError,
    KeyConflict,
    KeyNotFound,
    ManifestError,
    ObjectNotFound,
    PayloadTooLarge,
    PlacementConflict,
    SandboxNotFound,
    SandboxStateError,
    Standby,
    StoreError,
    ToolError,
    UnsafeInput,
    UnsafePath,
    VMError,
    WorkerConflict,
    WorkerNotFound,
    WorkerReplyError,
    WorkerTimeout,
    WorkerUnavailable,
)
from forkyard.wire.output import encode_output

__all__ = [
    "ERROR_TYPES",
    "ApiError",
    "WorkerReply",
    "allowed_methods",
    "emitted_types",
    "error_body",
    "install_error_handlers",
    "status_for",
]

log = logging.getLogger("forkyard.control")

# status -> error type for errors raised by the services themselves
ERROR_TYPES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid",
    429: "rate_limited",
    500: "internal",
    502: "worker_error",
    503: "unavailable",
    504: "timeout",
}

# forkyard.errors -> (status, type).  First match wins, so subclasses come
# before their bases (GuestFileNotFound and CommandTimeout are GuestErrors,
# PayloadTooLarge is an AgentError, ObjectNotFound is a StoreError).
_TABLE: tuple[tuple[type[ForkyardError], int, str], ...] = (
    (SandboxNotFound, 404, "not_found"),
    (CheckpointNotFound, 404, "not_found"),
    (ImageNotFound, 404, "not_found"),
    (GuestFileNotFound, 404, "not_found"),
    (ObjectNotFound, 404, "not_found"),
    (WorkerNotFound, 404, "not_found"),
    (KeyNotFound, 404, "not_found"),
    (Forbidden, 403, "forbidden"),
    (KeyConflict, 409, "conflict"),
    (SandboxStateError, 409, "conflict"),
    (WorkerConflict, 409, "conflict"),
    (PlacementConflict, 409, "conflict"),
    (PayloadTooLarge, 413, "too_large"),
    (CommandTimeout, 504, "timeout"),
    (AgentTimeout, 504, "timeout"),
    (WorkerTimeout, 504, "timeout"),
    (IntegrityError, 409, "integrity"),
    (ManifestError, 409, "integrity"),
    (IncompatibleCheckpoint, 409, "incompatible"),
    (GuestError, 422, "guest_error"),
    # untrusted names/inputs refused before use: the caller's fault
    (UnsafePath, 400, "bad_request"),
    (UnsafeInput, 400, "bad_request"),
    (BadWorkerReport, 400, "bad_request"),
    # nothing can take the work now: retry later (or ask for a smaller sandbox)
    (InsufficientCapacity, 503, "insufficient_capacity"),
    (WorkerUnavailable, 503, "unavailable"),
    (DatabaseUnavailable, 503, "unavailable"),
    (Standby, 503, "standby"),
    (WorkerReplyError, 502, "worker_error"),
    (VMError, 502, "worker_error"),
    (AgentError, 502, "worker_error"),
    (ToolError, 502, "worker_error"),
    (StoreError, 502, "worker_error"),
    (ForkyardError, 500, "internal"),
)


class ApiError(Exception):
    """An HTTP-level refusal of the serving layer itself (a bad Content-Length, a body
    over the limit): a status from :data:`ERROR_TYPES`.  Domain code raises
    :mod:`forkyard.errors` classes instead and this table maps them."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        detail: Any = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "internal")
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return _body(self.type, self.message, self.detail)


class WorkerReply(Exception):
    """A worker answered with an error: relay its status and body unchanged."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        err = body.get("error", {})
        super().__init__(f"{status} {err.get('type')}: {err.get('message')}")

    @property
    def type(self) -> str:
        return str(self.body.get("error", {}).get("type", ""))


def _body(type_: str, message: str, detail: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "detail": detail}}


def status_for(exc: ForkyardError) -> tuple[int, str]:
    for cls, status, type_ in _TABLE:
        if isinstance(exc, cls):
            return status, type_
    raise AssertionError("unreachable: ForkyardError is the last row")  # pragma: no cover


def emitted_types() -> frozenset[tuple[int, str]]:
    """Every ``(status, type)`` an error body of either service can carry (the SDK maps each)."""
    return frozenset(ERROR_TYPES.items()) | {(status, type_) for _, status, type_ in _TABLE}


def _detail(exc: ForkyardError) -> dict[str, Any] | None:
    """Machine-readable facts a client can act on (never host paths or tracebacks)."""
    if isinstance(exc, CommandTimeout):
        result = exc.result
        out, out_enc = encode_output(getattr(result, "stdout_bytes", b""))
        err, err_enc = encode_output(getattr(result, "stderr_bytes", b""))
        return {"kind": exc.kind, "timeout": exc.timeout, "stdout": out,
                "stdout_encoding": out_enc, "stderr": err, "stderr_encoding": err_enc}
    if isinstance(exc, GuestError):
        return {"kind": exc.kind, "errno": exc.errno}
    if isinstance(exc, SandboxStateError):
        return {"sandbox": exc.sandbox_id, "state": exc.state, "operation": exc.operation}
    if isinstance(exc, PayloadTooLarge):
        return {"size": exc.size, "limit": exc.limit}
    if isinstance(exc, InsufficientCapacity):
        return {"worker": exc.worker or None, "resource": exc.resource, "needed": exc.needed,
                "free": exc.free, "limit": exc.limit}
    if isinstance(exc, IntegrityError):
        return {"what": exc.what, "expected": exc.expected, "actual": exc.actual}
    return None


def error_body(exc: ForkyardError) -> tuple[int, dict[str, Any]]:
    status, type_ = status_for(exc)
    return status, _body(type_, str(exc), _detail(exc))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "GET", "type": "http"})
            # a method-agnostic FULL or PARTIAL match means the path is this route's
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as ``{"error": {...}}`` with a status of the table."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers or None)

    async def on_worker_reply(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, WorkerReply)
        return JSONResponse(exc.body, exc.status)

    async def on_forkyard_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ForkyardError)
        status, body = error_body(exc)
        if status == 500:
            log.error("unmapped forkyard error", exc_info=exc)
        return JSONResponse(body, status)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = jsonable_encoder(exc.errors(), custom_encoder={BaseException: str})
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"invalid request: {where}: {first.get('msg', 'invalid')}"
        return JSONResponse(_body("invalid", message, errors), 422)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code if exc.status_code in ERROR_TYPES else 400
        headers = dict(exc.headers) if exc.headers else {}
        if status == 405:
            # Starlette names only the first route whose path matched; a path
            # served by several routes (GET and POST /v1/sandboxes) allows them all
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(
            _body(ERROR_TYPES[status], str(exc.detail), None), status,
            headers=headers or None,
        )

    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return JSONResponse(_body("internal", f"internal error: {type(exc).__name__}", None), 500)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(WorkerReply, on_worker_reply)
    app.add_exception_handler(ForkyardError, on_forkyard_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_bug)
