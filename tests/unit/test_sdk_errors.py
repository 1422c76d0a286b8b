"""The SDK's one status → exception table, detail attributes, and transport failures."""

from __future__ import annotations

import httpx
import pytest

from forkyard.errors import ForkyardError
from forkyard.sdk import errors as e


def _response(status: int, body: object = None, *, content: bytes | None = None
              ) -> httpx.Response:
    request = httpx.Request("POST", "http://cp.test/v1/sandboxes/sb-1/exec")
    if content is not None:
        return httpx.Response(status, content=content, request=request)
    return httpx.Response(status, json=body, request=request)


def _err(status: int, type_: str, detail: object = None, message: str = "msg"
         ) -> e.APIError:
    body = {"error": {"type": type_, "message": message, "detail": detail}}
    return e.error_from_response(_response(status, body))


@pytest.mark.parametrize(
    ("status", "type_", "cls"),
    [
        (400, "bad_request", e.InvalidRequest),
        (401, "unauthorized", e.AuthenticationError),
        (404, "not_found", e.NotFoundError),
        (405, "method_not_allowed", e.InvalidRequest),
        (409, "conflict", e.ConflictError),
        (409, "integrity", e.IntegrityFailure),
        (409, "incompatible", e.IncompatibleError),
        (413, "too_large", e.TooLarge),
        (422, "invalid", e.InvalidRequest),
        (422, "guest_error", e.GuestOperationError),
        (500, "internal", e.InternalError),
        (502, "worker_error", e.WorkerError),
        (503, "unavailable", e.Unavailable),
        (504, "timeout", e.SandboxTimeout),
    ],
)
def test_every_documented_status_maps_to_its_class(status, type_, cls):
    err = _err(status, type_)
    assert type(err) is cls
    assert isinstance(err, ForkyardError)
    assert (err.status, err.type, err.message) == (status, type_, "msg")
    assert err.method == "POST"
    assert err.url == "http://cp.test/v1/sandboxes/sb-1/exec"


def test_table_rows_are_unique_and_cover_the_api_statuses():
    keys = [(r.status, r.type_) for r in e.ERROR_TABLE]
    assert len(keys) == len(set(keys))
    documented = {400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 502, 503, 504}  # docs/api.md
    assert {s for s, t in keys if t is None} == documented


@pytest.mark.parametrize(("status", "cls"), [(405, e.InvalidRequest), (418, e.InvalidRequest),
                                             (507, e.InternalError), (599, e.InternalError)])
def test_unknown_statuses_fall_back_by_class(status, cls):
    assert type(_err(status, "whatever")) is cls


def test_unknown_type_with_a_known_status_uses_the_status_row():
    assert type(_err(409, "brand_new_kind")) is e.ConflictError


def test_conflict_detail_becomes_attributes():
    err = _err(409, "conflict",
               {"sandbox": "sb-1", "state": "hibernated", "operation": "exec", "extra": 1})
    assert isinstance(err, e.ConflictError)
    assert (err.sandbox, err.state, err.operation) == ("sb-1", "hibernated", "exec")
    assert err.detail["extra"] == 1


def test_timeout_carries_the_commands_output_exactly():
    err = _err(504, "timeout", {"kind": "timeout", "timeout": 2.0, "stdout": "cGFydP8=",
                                "stdout_encoding": "base64", "stderr": "w\u00e4rn",
                                "stderr_encoding": "utf-8"})
    assert isinstance(err, e.SandboxTimeout)
    assert isinstance(err, TimeoutError)  # `except TimeoutError` catches it too
    assert err.stdout == "part\ufffd"
    assert err.stdout_bytes == b"part\xff"
    assert err.stderr == "w\u00e4rn" and err.stderr_bytes == "w\u00e4rn".encode()
    assert err.timeout == 2.0


def test_timeout_detail_from_the_server_table_round_trips():
    # the server's own detail for a CommandTimeout, read back by the SDK
    from forkyard.errors import CommandTimeout
    from forkyard.guest.client import ExecResult
    from forkyard.wire.errors import error_body

    status, body = error_body(CommandTimeout("yes", 1.0, ExecResult(-9, b"y\n\xfe", b"")))
    err = _err(status, body["error"]["type"], body["error"]["detail"])
    assert isinstance(err, e.SandboxTimeout)
    assert err.stdout_bytes == b"y\n\xfe" and err.stderr_bytes == b"" and err.stderr == ""
    assert "stdout_b64" not in body["error"]["detail"]  # carried once


def test_timeout_without_output_or_with_a_garbled_one():
    bare = _err(504, "timeout")
    assert bare.stdout is None and bare.stdout_bytes == b""
    # an error is being reported: a malformed stream must not hide it behind another error
    bad = _err(504, "timeout", {"stdout": "not base64!", "stdout_encoding": "base64"})
    assert bad.stdout_bytes == b"not base64!"
    odd = _err(504, "timeout", {"stdout": "x", "stdout_encoding": "rot13"})
    assert odd.stdout == "x"


def test_every_error_the_servers_can_emit_has_its_own_row():
    # the wire table is the servers' side of this one table: each (status, type)
    # either has an exact row or its status has one; none falls to the 4xx/5xx guess
    from forkyard.wire.errors import emitted_types

    by_key = {(r.status, r.type_): r.cls for r in e.ERROR_TABLE}
    emitted = emitted_types()
    assert (409, "integrity") in emitted and (404, "not_found") in emitted
    for status, type_ in emitted:
        assert (status, type_) in by_key or (status, None) in by_key, (status, type_)
        cls = e.error_class(status, type_)
        if type_ in ("integrity", "incompatible", "guest_error"):
            assert by_key.get((status, type_)) is cls, type_  # the specific class, not the base


def test_guest_error_detail():
    err = _err(422, "guest_error", {"kind": "io", "errno": 21})
    assert isinstance(err, e.GuestOperationError)
    assert isinstance(err, e.InvalidRequest)
    assert (err.kind, err.errno) == ("io", 21)


def test_too_large_and_integrity_detail():
    big = _err(413, "too_large", {"size": 70_000_000, "limit": 67_108_864})
    assert isinstance(big, e.TooLarge)
    assert (big.size, big.limit) == (70_000_000, 67_108_864)
    bad = _err(409, "integrity", {"what": "layer", "expected": "aa", "actual": "bb"})
    assert isinstance(bad, e.IntegrityFailure)
    assert (bad.what, bad.expected, bad.actual) == ("layer", "aa", "bb")


def test_missing_detail_keys_are_none_not_attribute_errors():
    err = _err(409, "conflict", None)
    assert isinstance(err, e.ConflictError)
    assert err.state is None and err.detail == {}


def test_validation_error_list_is_kept():
    err = _err(422, "invalid", [{"loc": ["body", "count"], "msg": "too small"}])
    assert isinstance(err, e.InvalidRequest)
    assert err.detail["errors"][0]["msg"] == "too small"


def test_non_json_error_body_still_maps_by_status():
    err = e.error_from_response(_response(502, content=b"<html>Bad Gateway</html>"))
    assert type(err) is e.WorkerError
    assert "Bad Gateway" in str(err)
    assert err.type == ""


def test_empty_error_body_gets_a_message():
    err = e.error_from_response(_response(503, content=b""))
    assert type(err) is e.Unavailable
    assert "503" in str(err)


def test_connect_error_becomes_unavailable_with_a_hint():
    req = httpx.Request("GET", "http://127.0.0.1:9/v1/sandboxes")
    err = e.from_transport_error(httpx.ConnectError("refused", request=req), "http://127.0.0.1:9")
    assert type(err) is e.Unavailable
    assert "forkyard status" in str(err)
    assert err.url == "http://127.0.0.1:9/v1/sandboxes"


def test_read_timeout_becomes_sandbox_timeout():
    req = httpx.Request("POST", "http://cp.test/v1/sandboxes")
    err = e.from_transport_error(httpx.ReadTimeout("slow", request=req), "http://cp.test")
    assert type(err) is e.SandboxTimeout
    assert err.type == "client_timeout"


def test_other_transport_errors_become_unavailable():
    req = httpx.Request("GET", "http://cp.test/health")
    err = e.from_transport_error(httpx.RemoteProtocolError("bad", request=req), "http://cp.test")
    assert type(err) is e.Unavailable
