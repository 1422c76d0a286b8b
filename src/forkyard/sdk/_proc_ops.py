"""The process endpoints (``/v1/sandboxes/{id}/procs...``) as :class:`Call` descriptions.

Output is followed on the control plane's NDJSON stream (``.../stream``),
each event bounded (1 MiB a stream) and read only as the caller takes them,
so a slow consumer slows the command (lossless mode) or loses old output,
never grows this process's memory.  The long poll by offset (``output``,
``wait``) is the fallback when a stream breaks twice in a row.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from forkyard.sdk._http import Call, json_body, no_body
from forkyard.sdk.errors import ResponseFormatError
from forkyard.wire.output import decode_output

__all__ = ["POLL_WAIT", "STDIN_CHUNK", "Output", "ProcessInfo", "aevents", "events",
           "list_procs", "output", "parse_output", "resize", "signal", "spawn", "stdin",
           "stream"]

POLL_WAIT = 20.0  # seconds one read waits in the guest for output
STDIN_CHUNK = 256 * 1024
# one event of the stream: 1 MiB a stream, base64 at worst, and the JSON around it
STREAM_LINE_MAX = 4 * 1024 * 1024
_QUICK = 30.0


def _p(sandbox_id: str, pid: int | None = None) -> str:
    base = f"/v1/sandboxes/{quote(sandbox_id, safe='')}/procs"
    return base if pid is None else f"{base}/{int(pid)}"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A process the guest agent keeps (``sb.commands.list()``)."""

    pid: int
    command: str
    running: bool
    pty: bool
    exit_code: int | None
    started_ns: int
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Output:
    """One read: bytes at ``out_offset``/``err_offset`` and, at the end, the exit status."""

    stdout: bytes
    stderr: bytes
    out_offset: int
    err_offset: int
    exited: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool


def _obj(r: httpx.Response) -> dict[str, Any]:
    d = json_body(r)
    if not isinstance(d, dict):
        raise ResponseFormatError(f"{r.request.url.path}: expected a JSON object")
    return d


def _output(r: httpx.Response) -> Output:
    return parse_output(_obj(r))


def parse_output(d: Any) -> Output:
    if not isinstance(d, dict):
        raise ResponseFormatError("process output: expected a JSON object")
    try:
        return Output(decode_output(d["stdout"], d.get("stdout_encoding", "utf-8")),
                      decode_output(d["stderr"], d.get("stderr_encoding", "utf-8")),
                      int(d["out_offset"]), int(d["err_offset"]), bool(d["exited"]),
                      d.get("exit_code"), d.get("signal"), bool(d.get("timed_out", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ResponseFormatError(f"process output: {exc}") from exc


def _infos(r: httpx.Response) -> list[ProcessInfo]:
    data = json_body(r)
    if not isinstance(data, list):
        raise ResponseFormatError("process list: expected a JSON array")
    try:
        return [ProcessInfo(int(x["pid"]), str(x["command"]), bool(x["running"]),
                            bool(x["pty"]), x.get("exit_code"), int(x["started_ns"]),
                            bool(x.get("timed_out", False))) for x in data]
    except (KeyError, TypeError, ValueError) as exc:
        raise ResponseFormatError(f"process list: {exc}") from exc


def spawn(sandbox_id: str, cmd: str | Sequence[str] | None, *, env: Mapping[str, str] | None,
          cwd: str | None, timeout: float | None, stdin: bytes | str | None, keep_stdin: bool,
          lossless: bool, user: str | None, pty: tuple[int, int] | None) -> Call[int]:
    if cmd is not None and not isinstance(cmd, str):
        cmd = [str(a) for a in cmd]
        if not cmd:
            raise ValueError("empty argv")
    data = stdin.encode() if isinstance(stdin, str) else stdin
    body = {"cmd": cmd, "env": dict(env or {}), "cwd": cwd, "timeout": timeout,
            "stdin_b64": base64.b64encode(data).decode() if data else None,
            "keep_stdin": keep_stdin, "lossless": lossless, "user": user,
            "pty": None if pty is None else {"rows": pty[0], "cols": pty[1]}}

    def parse(r: httpx.Response) -> int:
        pid = _obj(r).get("pid")
        if not isinstance(pid, int):
            raise ResponseFormatError("spawn: reply has no pid")
        return pid

    return Call("POST", _p(sandbox_id), parse, json=body, timeout=_QUICK)


def output(sandbox_id: str, pid: int, out: int, err: int, wait: float = POLL_WAIT) -> Call[Output]:
    return Call("GET", f"{_p(sandbox_id, pid)}/output", _output,
                params={"out": out, "err": err, "wait": str(wait)}, timeout=wait + _QUICK)


def stream(sandbox_id: str, pid: int, out: int, err: int) -> Call[None]:
    """The NDJSON stream of outputs (body read by ``SyncHTTP.stream``); an event at least
    every 20 s keeps it alive, so the timeout bounds a silent gap."""
    return Call("GET", f"{_p(sandbox_id, pid)}/stream", no_body,
                params={"out": out, "err": err}, timeout=POLL_WAIT + _QUICK)


def _event(line: bytes) -> Output:
    try:
        return parse_output(json.loads(line))
    except ValueError as exc:
        raise ResponseFormatError(f"process stream: a line is not JSON ({exc})") from exc


def _split(buf: bytearray, chunk: bytes) -> list[bytes]:
    buf += chunk
    lines = []
    while (i := buf.find(b"\n")) >= 0:
        lines.append(bytes(buf[:i]))
        del buf[: i + 1]
    if len(buf) > STREAM_LINE_MAX:
        raise ResponseFormatError(f"process stream: a line over {STREAM_LINE_MAX} bytes")
    return [line for line in lines if line.strip()]


def events(chunks: Iterable[bytes]) -> Iterator[Output]:
    """NDJSON chunks as outputs, one line held at a time (each bounded)."""
    buf = bytearray()
    for chunk in chunks:
        for line in _split(buf, chunk):
            yield _event(line)


async def aevents(chunks: AsyncIterable[bytes]) -> AsyncIterator[Output]:
    buf = bytearray()
    async for chunk in chunks:
        for line in _split(buf, chunk):
            yield _event(line)


def stdin(sandbox_id: str, pid: int, data: bytes, eof: bool) -> Call[int]:
    def parse(r: httpx.Response) -> int:
        n = _obj(r).get("pending")
        return n if isinstance(n, int) else 0

    return Call("POST", f"{_p(sandbox_id, pid)}/stdin", parse,
                params={"eof": "true" if eof else "false"}, content=data, timeout=_QUICK)


def list_procs(sandbox_id: str) -> Call[list[ProcessInfo]]:
    return Call("GET", _p(sandbox_id), _infos, timeout=_QUICK)


def resize(sandbox_id: str, pid: int, rows: int, cols: int) -> Call[None]:
    return Call("POST", f"{_p(sandbox_id, pid)}/resize", no_body,
                json={"rows": rows, "cols": cols}, timeout=_QUICK)


def signal(sandbox_id: str, pid: int, sig: int) -> Call[None]:
    return Call("POST", f"{_p(sandbox_id, pid)}/signal", no_body, json={"signal": sig},
                timeout=_QUICK)
