"""Errors the SDK raises, mapped from the control plane's HTTP answers by ONE table.

Every error body of the API (docs/api.md) has the shape
``{"error": {"type": ..., "message": ..., "detail": {...}}}``.  The class is
chosen by ``(status, type)`` in :data:`ERROR_TABLE`, falling back to the row
for ``(status, None)``, then to the status class (4xx / 5xx).  ``detail``
is kept whole in :attr:`APIError.detail`, and the keys a class documents are
also copied into typed attributes (``SandboxTimeout.stdout``,
``GuestOperationError.errno``, ...).

Failures below HTTP (refused connection, reset, client-side timeout) are
translated at the same boundary by :func:`from_transport_error`, so callers
never see an ``httpx`` exception::

    ForkyardError
    ├── ConfigurationError          no URL/token given and no running cluster found
    ├── ResponseFormatError         a 2xx reply that does not match docs/api.md
    └── APIError                    .status .type .message .detail .method .url
        ├── InvalidRequest          400 bad_request, 405 method_not_allowed, 422 invalid
        │   └── GuestOperationError 422 guest_error (.kind .errno)
        ├── AuthenticationError     401
        ├── PermissionDenied        403 (a tenant key on an admin-only route)
        ├── NotFoundError           404
        ├── ConflictError           409 (.sandbox .state .operation)
        │   ├── IntegrityFailure    409 integrity
        │   ├── IncompatibleError   409 incompatible
        │   └── PublishFailed       checkpoint state "failed" (Checkpoint.wait_published)
        ├── TooLarge                413 (.size .limit)
        ├── RateLimited             429 (.retry_after: seconds, from Retry-After)
        ├── InternalError           500, unknown 5xx
        ├── WorkerError             502 (.log_tail)
        ├── Unavailable             503, or the control plane cannot be reached
        │   └── InsufficientCapacity 503 insufficient_capacity (.resource .needed .free
        │                           .worker .limit): no worker has room for that shape
        └── SandboxTimeout          504 (.stdout[_bytes] .stderr[_bytes] .timeout), or no
                                    answer in time
                                    (also a builtin ``TimeoutError``)

``exec(..., check=True)`` raises :class:`forkyard.errors.CommandFailed`, the
same class the worker library raises, with the result in ``.result``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from forkyard.errors import CommandFailed, ForkyardError
from forkyard.wire.output import decode_output

__all__ = [
    "ERROR_TABLE",
    "APIError",
    "AuthenticationError",
    "CommandFailed",
    "ConfigurationError",
    "ConflictError",
    "GuestOperationError",
    "IncompatibleError",
    "InsufficientCapacity",
    "IntegrityFailure",
    "InternalError",
    "InvalidRequest",
    "NotFoundError",
    "PermissionDenied",
    "PublishFailed",
    "RateLimited",
    "ResponseFormatError",
    "SandboxTimeout",
    "TooLarge",
    "Unavailable",
    "WorkerError",
    "error_from_response",
    "from_transport_error",
]


class ConfigurationError(ForkyardError):
    """No control plane to talk to: nothing given, nothing in the environment, no cluster."""


class ResponseFormatError(ForkyardError):
    """A successful reply of the control plane does not have the documented shape."""


class APIError(ForkyardError):
    """The control plane answered with an error status (or could not be reached)."""

    # detail keys copied into attributes of the same name (None when absent)
    detail_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        type: str = "",
        detail: Mapping[str, Any] | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        self.status = status
        self.type = type
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})
        self.method = method
        self.url = url
        for name in self.detail_fields:
            setattr(self, name, self.detail.get(name))
        super().__init__(message)


class InvalidRequest(APIError):
    """400/405/422: the request was malformed or failed validation."""


class GuestOperationError(InvalidRequest):
    """422 ``guest_error``: the guest refused the operation (``errno``, ``kind``)."""

    detail_fields = ("kind", "errno")
    kind: str | None
    errno: int | None


class AuthenticationError(APIError):
    """401: missing or wrong API token."""


class PermissionDenied(APIError):
    """403: the key is valid but may not do this (admin-only routes)."""


class NotFoundError(APIError):
    """404: no such sandbox, checkpoint, worker, image or guest file."""


class ConflictError(APIError):
    """409: the operation is not valid in the object's current state."""

    detail_fields: ClassVar[tuple[str, ...]] = ("sandbox", "state", "operation")
    sandbox: str | None
    state: str | None
    operation: str | None


class IntegrityFailure(ConflictError):
    """409 ``integrity``: stored bytes do not match their digest."""

    detail_fields = ("sandbox", "state", "operation", "what", "expected", "actual")
    what: str | None
    expected: str | None
    actual: str | None


class IncompatibleError(ConflictError):
    """409 ``incompatible``: the target worker cannot load that checkpoint."""


class PublishFailed(ConflictError):
    """The checkpoint could not be published; it stays forkable on its own worker."""


class TooLarge(APIError):
    """413: a file or body over the limit (64 MiB)."""

    detail_fields = ("size", "limit")
    size: int | None
    limit: int | None


class RateLimited(APIError):
    """429: this key sent too many requests; retry after ``detail["retry_after"]`` s."""

    detail_fields = ("retry_after",)
    retry_after: float | None


class InternalError(APIError):
    """500 (or an unknown 5xx): a bug in the control plane."""


class WorkerError(APIError):
    """502: the worker failed in a way that is not the caller's fault (VM error)."""

    detail_fields = ("log_tail",)
    log_tail: str | None


class Unavailable(APIError):
    """503: no live worker can take the request; also: control plane unreachable."""


class InsufficientCapacity(Unavailable):
    """503 ``insufficient_capacity``: no worker has the memory, vCPUs or sandbox slot
    the sandbox needs (``resource``; ``needed`` vs ``free``, MiB for memory).
    Nothing was started; a smaller sandbox, or later, may fit."""

    detail_fields = ("worker", "resource", "needed", "free", "limit")
    worker: str | None
    resource: str | None
    needed: int | None
    free: int | None
    limit: int | None


class SandboxTimeout(APIError, TimeoutError):
    """504: a guest command or agent call timed out; or the HTTP answer did not come.

    For a command, ``stdout``/``stderr`` hold what it printed before it was killed
    (``None`` when the reply carried no output), ``stdout_bytes``/``stderr_bytes``
    the exact bytes.
    """

    detail_fields = ("timeout",)
    timeout: float | None

    @property
    def stdout(self) -> str | None:
        return self._text("stdout")

    @property
    def stderr(self) -> str | None:
        return self._text("stderr")

    @property
    def stdout_bytes(self) -> bytes:
        return _stream(self.detail, "stdout")

    @property
    def stderr_bytes(self) -> bytes:
        return _stream(self.detail, "stderr")

    def _text(self, stream: str) -> str | None:
        if not isinstance(self.detail.get(stream), str):
            return None
        return _stream(self.detail, stream).decode("utf-8", "replace")


def _stream(detail: Mapping[str, Any], stream: str) -> bytes:
    # encoded once, as an exec result's streams are (forkyard.wire.output)
    value = detail.get(stream)
    if not isinstance(value, str):
        return b""
    try:
        return decode_output(value, str(detail.get(f"{stream}_encoding", "utf-8")))
    except ValueError:
        # an error is being reported: keep what it says rather than fail on it
        return value.encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class _Row:
    status: int
    type_: str | None  # None: any type with this status
    cls: type[APIError]


# THE table.  Order does not matter: lookup is exact (status, type) first.  Its
# other side is the servers' table (forkyard.wire.errors): a test checks that
# every (status, type) they can emit has a row here.
ERROR_TABLE: tuple[_Row, ...] = (
    _Row(400, None, InvalidRequest),
    _Row(401, None, AuthenticationError),
    _Row(403, None, PermissionDenied),
    _Row(404, None, NotFoundError),
    _Row(405, None, InvalidRequest),
    _Row(409, None, ConflictError),
    _Row(409, "integrity", IntegrityFailure),
    _Row(409, "incompatible", IncompatibleError),
    _Row(413, None, TooLarge),
    _Row(422, None, InvalidRequest),
    _Row(422, "guest_error", GuestOperationError),
    _Row(429, None, RateLimited),
    _Row(500, None, InternalError),
    _Row(502, None, WorkerError),
    _Row(503, None, Unavailable),
    _Row(503, "insufficient_capacity", InsufficientCapacity),
    _Row(504, None, SandboxTimeout),
)
_BY_KEY: dict[tuple[int, str | None], type[APIError]] = {
    (r.status, r.type_): r.cls for r in ERROR_TABLE
}


def error_class(status: int, type_: str | None) -> type[APIError]:
    cls = _BY_KEY.get((status, type_)) or _BY_KEY.get((status, None))
    if cls is not None:
        return cls
    return InternalError if status >= 500 else InvalidRequest if status >= 400 else APIError


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response; the body must already be read."""
    status = response.status_code
    type_, message, detail = _parse_body(response)
    request = response.request if _has_request(response) else None
    return error_class(status, type_)(
        message or f"HTTP {status} {response.reason_phrase}".strip(),
        status=status,
        type=type_ or "",
        detail=detail,
        method=request.method if request is not None else "",
        url=str(request.url) if request is not None else "",
    )


def _has_request(response: httpx.Response) -> bool:
    try:
        response.request  # noqa: B018 - raises RuntimeError when there is none
    except RuntimeError:
        return False
    return True


def _parse_body(response: httpx.Response) -> tuple[str | None, str, dict[str, Any]]:
    # A proxy or a crashed server may answer with HTML or nothing: keep a
    # short excerpt as the message rather than failing on the error itself.
    try:
        body = json.loads(response.content)
    except ValueError:
        text = response.content[:200].decode("utf-8", "replace").strip()
        return None, text, {}
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, str(body)[:200], {}
    detail = err.get("detail")
    if isinstance(detail, list):  # FastAPI's validation errors (422 invalid)
        detail = {"errors": detail}
    if not isinstance(detail, dict):
        detail = {} if detail is None else {"value": detail}
    type_ = err.get("type")
    return (str(type_) if type_ else None), str(err.get("message", "")), detail


def from_transport_error(exc: httpx.HTTPError, base_url: str) -> APIError:
    """Translate a failure below HTTP into the SDK tree (the caller chains ``from exc``)."""
    try:
        req: httpx.Request | None = exc.request
    except RuntimeError:
        req = None
    method = req.method if req is not None else ""
    url = str(req.url) if req is not None else base_url
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Unavailable(
            f"cannot reach the forkyard control plane at {base_url} ({exc or type(exc).__name__}); "
            "is the cluster running? (`forkyard status`)",
            type="unreachable", method=method, url=url,
        )
    if isinstance(exc, httpx.TimeoutException):
        return SandboxTimeout(
            f"no answer from {base_url} in time ({type(exc).__name__} on {method} {url})",
            type="client_timeout", method=method, url=url,
        )
    return Unavailable(
        f"connection to {base_url} failed: {exc or type(exc).__name__}",
        type="transport", method=method, url=url,
    )
