"""The SDK's side of the wire contract: one state enum, one output encoding, no server code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from forkyard import sdk
from forkyard.guest.client import MAX_FILE_SIZE
from forkyard.sdk.errors import ResponseFormatError
from forkyard.sdk.models import CommandResult, SandboxInfo
from forkyard.wire import lifecycle
from forkyard.wire.limits import MAX_FILE_BYTES
from forkyard.wire.models import ExecResultOut
from forkyard.wire.output import decode_output, encode_output

SAMPLES = [
    b"",
    b"plain ascii\n",
    "h\u00e9llo w\u00f6rld \u2603 \U0001f600\n".encode(),
    b"\x00nul is valid utf-8\x00",
    b"\xff\xfe invalid",
    "cut in the middle of \u00e9".encode()[:-1],  # a truncated multi-byte sequence
    bytes(range(256)),
]


def test_sandbox_state_is_the_one_lifecycle_enum():
    assert sdk.SandboxState is lifecycle.SandboxState
    info = SandboxInfo.from_json({"id": "sb-1", "state": "hibernated", "worker": None,
                                  "image": None, "memory_mb": None, "cpus": None,
                                  "created": None, "parent_checkpoint": None,
                                  "last_checkpoint": None, "error": None})
    assert info.state == sdk.SandboxState.HIBERNATED


def test_the_sdk_loads_no_guest_worker_control_or_server_framework_code():
    code = "import sys, forkyard.sdk, forkyard.sdk._ops; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    bad = [m for m in out if m.startswith(("forkyard.guest", "forkyard.worker",
                                           "forkyard.control", "forkyard.vm", "fastapi",
                                           "pydantic"))]
    assert bad == []


def test_the_api_file_limit_is_the_guest_agents():
    # the API must not accept a file the agent one hop later refuses (or the reverse)
    assert MAX_FILE_BYTES == MAX_FILE_SIZE


@pytest.mark.parametrize("data", SAMPLES)
def test_output_round_trips_exactly_and_is_sent_once(data):
    text, encoding = encode_output(data)
    assert decode_output(text, encoding) == data
    wire = json.loads(ExecResultOut.of(0, data, data, pid=1, signal=None, timed_out=False,
                                       truncated=False).model_dump_json())
    assert not any(k.endswith("_b64") for k in wire)
    assert CommandResult.from_json(wire).stdout_bytes == data
    assert CommandResult.from_json(wire).stderr_bytes == data
    # the SDK's own JSON form (CLI --json) is the same object
    assert CommandResult.from_json(wire).to_json() == wire


def test_utf8_output_travels_as_readable_text_and_other_bytes_as_base64():
    assert encode_output("caf\u00e9\n".encode()) == ("caf\u00e9\n", "utf-8")
    assert encode_output(b"\xff") == ("/w==", "base64")
    # once, not twice: a binary reply is about 4/3 of the output, not 2.33x
    blob = bytes(range(256)) * 4096
    size = len(ExecResultOut.of(0, blob, b"", pid=1, signal=None, timed_out=False,
                                truncated=False).model_dump_json())
    assert size < 1.4 * len(blob)


@pytest.mark.parametrize(("stream", "encoding"), [
    ("!!not base64!!", "base64"),
    ("x", "utf-16"),
    ("\ud800", "utf-8"),  # a lone surrogate cannot come from UTF-8 bytes
    (5, "utf-8"),
])
def test_a_malformed_exec_reply_is_a_response_format_error(stream, encoding):
    body = {"exit_code": 0, "stdout": stream, "stdout_encoding": encoding, "stderr": "",
            "pid": 1, "signal": None, "timed_out": False, "truncated": False}
    with pytest.raises(ResponseFormatError):
        CommandResult.from_json(body)


def test_a_reply_without_encoding_fields_is_text():
    r = CommandResult.from_json({"exit_code": 1, "stdout": "hi", "stderr": "", "pid": 3})
    assert (r.stdout_bytes, r.exit_code, r.ok) == (b"hi", 1, False)


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")} - {"from_json", "to_json"}


def test_the_sdk_results_read_like_the_worker_librarys():
    # code written against a local Worker sandbox reads a remote one's results alike
    from forkyard.guest.client import EntryInfo as GuestEntry
    from forkyard.guest.client import ExecResult

    assert _public(ExecResult) <= _public(CommandResult)
    assert _public(GuestEntry) <= _public(sdk.EntryInfo)
    local = ExecResult(2, b"o\xff", b"e", pid=9, signal=None, timed_out=False, truncated=True)
    remote = CommandResult(2, b"o\xff", b"e", pid=9, signal=None, timed_out=False,
                           truncated=True)
    assert {n: getattr(local, n) for n in _public(ExecResult)} == {
        n: getattr(remote, n) for n in _public(ExecResult)}


def test_large_output_full_of_json_escapes_travels_as_base64():
    # NULs are valid UTF-8 but six bytes each in JSON: 16 MiB of them would be 96 MiB
    nuls = b"\0" * (1 << 20)
    text, encoding = encode_output(nuls)
    assert encoding == "base64" and decode_output(text, encoding) == nuls
    wire = ExecResultOut.of(0, nuls, b"", pid=1, signal=None, timed_out=False,
                            truncated=False).model_dump_json()
    assert len(wire) < 1.4 * len(nuls)
    # ordinary logs stay text, however large; small outputs stay text whatever they hold
    log = b"".join(b"line %d: all fine\tok\n" % i for i in range(100_000))
    assert encode_output(log)[1] == "utf-8"
    assert encode_output(b"\x1b[31mred\x1b[0m\n")[1] == "utf-8"
