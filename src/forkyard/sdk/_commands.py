"""E2B-style process API of a sandbox: ``sb.commands`` and ``sb.pty`` (sync).

A :class:`CommandHandle` follows one process by offsets (see
:mod:`forkyard.sdk._proc_ops`): iterate it for ``(stream, bytes)`` events as
they come, or :meth:`~CommandHandle.wait` with ``on_stdout``/``on_stderr``
callbacks.  :meth:`wait` keeps at most ``max_output`` bytes a stream (the
rest is passed to the callbacks only, and ``truncated`` set), so a command
printing gigabytes costs bounded memory.
"""

from __future__ import annotations

import codecs
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from forkyard.sdk import _proc_ops as ops
from forkyard.sdk._proc_ops import Output, ProcessInfo
from forkyard.sdk.errors import (
    GuestOperationError,
    ResponseFormatError,
    SandboxTimeout,
    Unavailable,
)
from forkyard.sdk.models import CommandResult

if TYPE_CHECKING:
    from forkyard.sdk._http import SyncHTTP

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "CommandHandle",
    "Commands",
    "OutputFollower",
    "ProcessInfo",
    "Pty",
    "PtyHandle",
    "TextSink",
]

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
TextSink = Callable[[str], object]
_BUSY_BACKOFF = 0.05
# a live stream that failed this way is reopened (then the long poll takes over)
STREAM_BREAKS = (Unavailable, SandboxTimeout, ResponseFormatError)


class OutputFollower:
    """The state of following one process (offsets, kept output), for both SDKs."""

    def __init__(self, pid: int, out: int, err: int, max_output: int) -> None:
        self.pid = pid
        self.out, self.err = out, err
        self.dropped = 0  # bytes the guest's scrollback lost before we read them
        self.max_output = max_output
        self.kept: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = False
        self.last: Output | None = None
        self._dec = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in self.kept}

    @property
    def exited(self) -> bool:
        return self.last is not None and self.last.exited

    def take(self, o: Output) -> list[tuple[str, bytes]]:
        self.dropped += max(0, o.out_offset - self.out) + max(0, o.err_offset - self.err)
        self.out, self.err = o.out_offset + len(o.stdout), o.err_offset + len(o.stderr)
        self.last = o
        return [(s, d) for s, d in (("stdout", o.stdout), ("stderr", o.stderr)) if d]

    def keep(self, stream: str, data: bytes) -> None:
        buf = self.kept[stream]
        room = self.max_output - len(buf)
        if len(data) > room:
            self.truncated = True
        buf += data[: max(0, room)]

    def text(self, stream: str, data: bytes, final: bool = False) -> str:
        return self._dec[stream].decode(data, final)

    def result(self) -> CommandResult:
        o = self.last
        assert o is not None and o.exited
        return CommandResult(exit_code=o.exit_code if o.exit_code is not None else -1,
                             stdout_bytes=bytes(self.kept["stdout"]),
                             stderr_bytes=bytes(self.kept["stderr"]), pid=self.pid,
                             signal=o.signal, timed_out=o.timed_out,
                             truncated=self.truncated or self.dropped > 0)


class CommandHandle:
    """A process in the guest: its output as it comes, stdin, signals, exit."""

    def __init__(self, http: SyncHTTP, sandbox_id: str, pid: int, *, out: int = 0,
                 err: int = 0, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        self._http = http
        self.sandbox_id = sandbox_id
        self._f = OutputFollower(pid, out, err, max_output)

    @property
    def pid(self) -> int:
        return self._f.pid

    @property
    def dropped(self) -> int:
        return self._f.dropped

    @property
    def exit_code(self) -> int | None:
        return self._f.last.exit_code if self._f.exited and self._f.last else None

    @property
    def last(self) -> Output | None:
        """The latest read (its ``exited``, ``exit_code``, ``signal``, ``timed_out``)."""
        return self._f.last

    def read(self, wait: float = ops.POLL_WAIT) -> list[tuple[str, bytes]]:
        """One read: the events that came within ``wait`` seconds (maybe none)."""
        if self._f.exited:
            return []
        return self._f.take(self._http.call(ops.output(self.sandbox_id, self.pid, self._f.out,
                                                       self._f.err, wait)))

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        """``("stdout" | "stderr", bytes)`` events until the process ends.

        Read from the live stream; a stream that breaks is reopened from the
        offsets reached, and after two breaks in a row the long poll takes over.
        """
        breaks = 0
        while not self._f.exited:
            if breaks >= 2:
                yield from self.read()
                continue
            try:
                call = ops.stream(self.sandbox_id, self.pid, self._f.out, self._f.err)
                with contextlib.closing(self._http.stream(call)) as chunks:
                    for o in ops.events(chunks):
                        breaks = 0
                        yield from self._f.take(o)
                        if self._f.exited:
                            return
            except STREAM_BREAKS:
                pass
            breaks += 1

    def wait(self, *, on_stdout: TextSink | None = None,
             on_stderr: TextSink | None = None) -> CommandResult:
        """Follow to the end; callbacks get text as it arrives."""
        sinks = {"stdout": on_stdout, "stderr": on_stderr}
        for stream, data in self:
            self._f.keep(stream, data)
            sink = sinks[stream]
            if sink is not None:
                text = self._f.text(stream, data)
                if text:
                    sink(text)
        for stream, sink in sinks.items():
            tail = self._f.text(stream, b"", final=True)
            if sink is not None and tail:
                sink(tail)
        return self._f.result()

    def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        send_stdin(self._http, self.sandbox_id, self.pid, data, eof=eof)

    def close_stdin(self) -> None:
        self.send_stdin(b"", eof=True)

    def kill(self, signal: int = 9) -> None:
        self._http.call(ops.signal(self.sandbox_id, self.pid, signal))


class PtyHandle(CommandHandle):
    """A terminal session: :meth:`resize` on top of a command's handle."""

    def resize(self, rows: int, cols: int) -> None:
        self._http.call(ops.resize(self.sandbox_id, self.pid, rows, cols))


def send_stdin(http: SyncHTTP, sandbox_id: str, pid: int, data: bytes | str, *,
               eof: bool = False, timeout: float = 300.0) -> None:
    """Send in chunks; a full guest buffer is waited out (backpressure), up to ``timeout``."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    deadline = time.monotonic() + timeout
    chunks = [raw[i:i + ops.STDIN_CHUNK] for i in range(0, len(raw), ops.STDIN_CHUNK)] or [b""]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        while True:
            try:
                http.call(ops.stdin(sandbox_id, pid, chunk, eof and last))
                break
            except GuestOperationError as exc:
                if getattr(exc, "kind", None) != "busy" or time.monotonic() > deadline:
                    raise
                time.sleep(_BUSY_BACKOFF)


class Commands:
    """``sb.commands``: run, list, kill, send_stdin, connect."""

    def __init__(self, http: SyncHTTP, sandbox_id: str) -> None:
        self._http = http
        self._id = sandbox_id

    def start(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, timeout: float | None = None,
              stdin: bytes | str | None = None, keep_stdin: bool = False,
              user: str | None = None, lossless: bool = False,
              max_output: int = DEFAULT_MAX_OUTPUT) -> CommandHandle:
        """Start ``cmd`` in the background; the handle follows it from its first byte."""
        pid = self._http.call(ops.spawn(self._id, cmd, env=env, cwd=cwd, timeout=timeout,
                                        stdin=stdin, keep_stdin=keep_stdin, lossless=lossless,
                                        user=user, pty=None))
        return CommandHandle(self._http, self._id, pid, max_output=max_output)

    def run(self, cmd: str | Sequence[str], *, on_stdout: TextSink | None = None,
            on_stderr: TextSink | None = None, env: Mapping[str, str] | None = None,
            cwd: str | None = None, timeout: float | None = 60.0,
            stdin: bytes | str | None = None, user: str | None = None,
            max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        """Run to the end, output live to the callbacks; nothing is lost (lossless)."""
        h = self.start(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, user=user,
                       lossless=True, max_output=max_output)
        return h.wait(on_stdout=on_stdout, on_stderr=on_stderr)

    def list(self) -> list[ProcessInfo]:
        return self._http.call(ops.list_procs(self._id))

    def kill(self, pid: int, signal: int = 9) -> None:
        self._http.call(ops.signal(self._id, pid, signal))

    def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = False) -> None:
        send_stdin(self._http, self._id, pid, data, eof=eof)

    def connect(self, pid: int, *, from_start: bool = False) -> CommandHandle:
        """Attach to a running process: its new output (or its scrollback, ``from_start``)."""
        h = CommandHandle(self._http, self._id, pid)
        if not from_start:
            # a zero-wait read of an offset far ahead lands at the ends of both streams
            o = self._http.call(ops.output(self._id, pid, 2**62, 2**62, 0.0))
            h._f.out, h._f.err = o.out_offset, o.err_offset
        return h


class Pty:
    """``sb.pty``: terminal sessions (default: the user's login shell)."""

    def __init__(self, http: SyncHTTP, sandbox_id: str) -> None:
        self._http = http
        self._id = sandbox_id

    def create(self, *, rows: int = 24, cols: int = 80, cmd: str | Sequence[str] | None = None,
               env: Mapping[str, str] | None = None, cwd: str | None = None,
               user: str | None = None, timeout: float | None = None) -> PtyHandle:
        pid = self._http.call(ops.spawn(self._id, cmd, env=env, cwd=cwd, timeout=timeout,
                                        stdin=None, keep_stdin=True, lossless=True, user=user,
                                        pty=(rows, cols)))
        return PtyHandle(self._http, self._id, pid)

    def resize(self, pid: int, rows: int, cols: int) -> None:
        self._http.call(ops.resize(self._id, pid, rows, cols))

    def send_stdin(self, pid: int, data: bytes | str) -> None:
        send_stdin(self._http, self._id, pid, data)

    def kill(self, pid: int, signal: int = 9) -> None:
        self._http.call(ops.signal(self._id, pid, signal))
