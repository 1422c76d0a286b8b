"""The one error table (docs/api.md "Errors"), and relaying a worker's error replies."""

from __future__ import annotations

import json

import pytest

from forkyard import errors as e
from forkyard.control._workers import error_from_response
from forkyard.guest.client import ExecResult
from forkyard.wire.errors import ERROR_TYPES, WorkerReply, error_body


def answer(exc: Exception) -> tuple[int, str]:
    """The status and message ``exc`` becomes at the HTTP boundary."""
    assert isinstance(exc, e.WorkerReplyError), exc
    status, body = error_body(exc)
    assert body["error"]["type"] == "worker_error"
    return status, body["error"]["message"]

TABLE = [
    (e.SandboxNotFound("sb-x"), 404, "not_found"),
    (e.CheckpointNotFound("abc"), 404, "not_found"),
    (e.ImageNotFound("nope"), 404, "not_found"),
    (e.GuestFileNotFound("read", "no such file", kind="not_found", errno=2), 404, "not_found"),
    (e.ObjectNotFound("blobs/x"), 404, "not_found"),
    (e.SandboxStateError("sb-x", "hibernated", "exec in"), 409, "conflict"),
    (e.PayloadTooLarge("file /x", 10, 5), 413, "too_large"),
    (e.AgentTimeout("exec", 3.0), 504, "timeout"),
    (e.IntegrityError("layer", expected="a", actual="b"), 409, "integrity"),
    (e.ManifestError("bad manifest"), 409, "integrity"),
    (e.IncompatibleCheckpoint("tcg vs kvm"), 409, "incompatible"),
    (e.GuestError("exec", "not found", kind="not_found", errno=2), 422, "guest_error"),
    (e.CommandFailed("false", ExecResult(1, b"", b"")), 422, "guest_error"),
    (e.UnsafePath("../x"), 400, "bad_request"),
    (e.VMError("QEMU exited"), 502, "worker_error"),
    (e.AgentDisconnected("gone"), 502, "worker_error"),
    (e.AgentError("broken"), 502, "worker_error"),
    (e.ToolError("qemu-img failed", returncode=1), 502, "worker_error"),
    (e.StoreError("disk full"), 502, "worker_error"),
    (e.AmbiguousCheckpoint("abcdef", 2), 404, "not_found"),
    (e.SandboxBusy("sb-x", "waking", "destroy"), 409, "conflict"),
    (e.WorkerNotFound("w9"), 404, "not_found"),
    (e.WorkerConflict("w1", "name taken"), 409, "conflict"),
    (e.PlacementConflict("c" * 64, "w1", "w2"), 409, "conflict"),
    (e.BadWorkerReport("w1", "names w2"), 400, "bad_request"),
    (e.WorkerUnavailable("no live worker"), 503, "unavailable"),
    (e.DatabaseUnavailable("database error: OperationalError"), 503, "unavailable"),
    (e.WorkerTimeout("w1", "POST /sandboxes", 3.0), 504, "timeout"),
    (e.WorkerReplyError("w1", "garbage"), 502, "worker_error"),
    (e.DatabaseError("cannot migrate"), 500, "internal"),
    (e.CheckpointError("whatever"), 500, "internal"),
    (e.SetupError("no kernel"), 500, "internal"),
]


@pytest.mark.parametrize(("exc", "status", "type_"), TABLE,
                         ids=[type(t[0]).__name__ for t in TABLE])
def test_forkyard_errors_map_to_the_documented_status(exc, status, type_):
    got_status, body = error_body(exc)
    assert (got_status, body["error"]["type"]) == (status, type_)
    assert body["error"]["message"] == str(exc)
    assert got_status in ERROR_TYPES
    json.dumps(body)  # the body is plain JSON


def test_guest_error_detail_has_kind_and_errno():
    _, body = error_body(e.GuestError("chdir", "No such file", kind="io", errno=2))
    assert body["error"]["detail"] == {"kind": "io", "errno": 2}


def test_command_timeout_detail_carries_the_partial_output():
    result = ExecResult(-9, b"started\n\xff", b"warn\n", timed_out=True)
    status, body = error_body(e.CommandTimeout("sleep 30", 1.0, result))
    assert status == 504 and body["error"]["type"] == "timeout"
    detail = body["error"]["detail"]
    # each stream once, exactly: text when it is UTF-8, else base64
    assert detail["stdout"] == "c3RhcnRlZAr/" and detail["stdout_encoding"] == "base64"
    assert detail["stderr"] == "warn\n" and detail["stderr_encoding"] == "utf-8"
    assert "stdout_b64" not in detail and "stderr_b64" not in detail


def test_worker_error_bodies_are_relayed_unchanged():
    body = {"error": {"type": "guest_error", "message": "guest exec failed", "detail": {"x": 1}}}
    exc = error_from_response("w1", 422, json.dumps(body).encode())
    assert isinstance(exc, WorkerReply)
    assert (exc.status, exc.body) == (422, body)


def test_a_worker_refusing_our_token_is_not_the_callers_401():
    raw = json.dumps({"error": {"type": "unauthorized", "message": "x", "detail": None}})
    status, message = answer(error_from_response("w1", 401, raw.encode()))
    assert status == 502
    assert "worker token" in message


def test_garbage_from_a_worker_is_a_502():
    status, message = answer(error_from_response("w1", 500,
                                                 b"<html>Internal Server Error</html>"))
    assert status == 502
    assert "w1" in message and "500" in message
    # not our error shape
    status, _ = answer(error_from_response("w1", 404, b'{"detail": "Not Found"}'))
    assert status == 502


def test_a_state_refusal_carries_the_sandbox_state_and_operation():
    status, body = error_body(e.SandboxBusy("sb-x", "hibernating", "wake"))
    assert status == 409
    assert body["error"]["detail"] == {"sandbox": "sb-x", "state": "hibernating",
                                       "operation": "wake"}
    assert body["error"]["message"] == "sandbox sb-x is hibernating; retry when it settles"


def test_control_plane_rows_change_state_only_through_the_lifecycle_guard():
    import datetime as dt

    from forkyard.control._db import SandboxRow
    from forkyard.control._records import move
    from forkyard.wire.lifecycle import SandboxState as S

    old = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    row = SandboxRow(id="sb-" + "1" * 20, state=S.RUNNING, created=old, updated=old)
    move(row, S.HIBERNATING, "hibernate")
    assert row.state == S.HIBERNATING and row.updated > old
    with pytest.raises(e.SandboxStateError) as err:
        move(row, S.WAKING, "wake")  # hibernating -> waking skips hibernated
    assert (err.value.state, err.value.operation) == ("hibernating", "wake")
    assert row.state == S.HIBERNATING  # unchanged
    row.state = S.DESTROYED
    with pytest.raises(e.SandboxStateError):
        move(row, S.RUNNING)
