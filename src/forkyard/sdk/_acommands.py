"""The async twin of :mod:`forkyard.sdk._commands`: ``AsyncSandbox.commands`` and ``.pty``.

Same requests (:mod:`forkyard.sdk._proc_ops`) and the same follower state
(:class:`~forkyard.sdk._commands.OutputFollower`); only the client differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

from forkyard.sdk import _proc_ops as ops
from forkyard.sdk._commands import DEFAULT_MAX_OUTPUT, STREAM_BREAKS, OutputFollower, TextSink
from forkyard.sdk._proc_ops import Output, ProcessInfo
from forkyard.sdk.errors import GuestOperationError
from forkyard.sdk.models import CommandResult

if TYPE_CHECKING:
    from forkyard.sdk._http import AsyncHTTP

__all__ = ["AsyncCommandHandle", "AsyncCommands", "AsyncPty", "AsyncPtyHandle"]


class AsyncCommandHandle:
    """A process in the guest; ``async for stream, data in handle`` follows it."""

    def __init__(self, http: AsyncHTTP, sandbox_id: str, pid: int, *, out: int = 0,
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
    def last(self) -> Output | None:
        return self._f.last

    @property
    def exit_code(self) -> int | None:
        return self._f.last.exit_code if self._f.exited and self._f.last else None

    async def read(self, wait: float = ops.POLL_WAIT) -> list[tuple[str, bytes]]:
        if self._f.exited:
            return []
        return self._f.take(await self._http.call(
            ops.output(self.sandbox_id, self.pid, self._f.out, self._f.err, wait)))

    async def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        breaks = 0  # as the sync twin: the live stream, reopened, then the long poll
        while not self._f.exited:
            if breaks >= 2:
                for ev in await self.read():
                    yield ev
                continue
            try:
                call = ops.stream(self.sandbox_id, self.pid, self._f.out, self._f.err)
                chunks = await self._http.stream(call)
                try:
                    async for o in ops.aevents(chunks):
                        breaks = 0
                        for ev in self._f.take(o):
                            yield ev
                        if self._f.exited:
                            return
                finally:
                    await chunks.aclose()
            except STREAM_BREAKS:
                pass
            breaks += 1

    async def wait(self, *, on_stdout: TextSink | None = None,
                   on_stderr: TextSink | None = None) -> CommandResult:
        sinks = {"stdout": on_stdout, "stderr": on_stderr}
        async for stream, data in self:
            self._f.keep(stream, data)
            sink = sinks[stream]
            text = self._f.text(stream, data) if sink is not None else ""
            if sink is not None and text:
                sink(text)
        for stream, sink in sinks.items():
            tail = self._f.text(stream, b"", final=True)
            if sink is not None and tail:
                sink(tail)
        return self._f.result()

    async def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        await send_stdin(self._http, self.sandbox_id, self.pid, data, eof=eof)

    async def close_stdin(self) -> None:
        await self.send_stdin(b"", eof=True)

    async def kill(self, signal: int = 9) -> None:
        await self._http.call(ops.signal(self.sandbox_id, self.pid, signal))


class AsyncPtyHandle(AsyncCommandHandle):
    async def resize(self, rows: int, cols: int) -> None:
        await self._http.call(ops.resize(self.sandbox_id, self.pid, rows, cols))


async def send_stdin(http: AsyncHTTP, sandbox_id: str, pid: int, data: bytes | str, *,
                     eof: bool = False, timeout: float = 300.0) -> None:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    deadline = time.monotonic() + timeout
    chunks = [raw[i:i + ops.STDIN_CHUNK] for i in range(0, len(raw), ops.STDIN_CHUNK)] or [b""]
    for i, chunk in enumerate(chunks):
        while True:
            try:
                await http.call(ops.stdin(sandbox_id, pid, chunk, eof and i == len(chunks) - 1))
                break
            except GuestOperationError as exc:
                if getattr(exc, "kind", None) != "busy" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


class AsyncCommands:
    def __init__(self, http: AsyncHTTP, sandbox_id: str) -> None:
        self._http = http
        self._id = sandbox_id

    async def start(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, timeout: float | None = None,
                    stdin: bytes | str | None = None, keep_stdin: bool = False,
                    user: str | None = None, lossless: bool = False,
                    max_output: int = DEFAULT_MAX_OUTPUT) -> AsyncCommandHandle:
        pid = await self._http.call(ops.spawn(self._id, cmd, env=env, cwd=cwd, timeout=timeout,
                                              stdin=stdin, keep_stdin=keep_stdin,
                                              lossless=lossless, user=user, pty=None))
        return AsyncCommandHandle(self._http, self._id, pid, max_output=max_output)

    async def run(self, cmd: str | Sequence[str], *, on_stdout: TextSink | None = None,
                  on_stderr: TextSink | None = None, env: Mapping[str, str] | None = None,
                  cwd: str | None = None, timeout: float | None = 60.0,
                  stdin: bytes | str | None = None, user: str | None = None,
                  max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        h = await self.start(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, user=user,
                             lossless=True, max_output=max_output)
        return await h.wait(on_stdout=on_stdout, on_stderr=on_stderr)

    async def list(self) -> list[ProcessInfo]:
        return await self._http.call(ops.list_procs(self._id))

    async def kill(self, pid: int, signal: int = 9) -> None:
        await self._http.call(ops.signal(self._id, pid, signal))

    async def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = False) -> None:
        await send_stdin(self._http, self._id, pid, data, eof=eof)

    async def connect(self, pid: int, *, from_start: bool = False) -> AsyncCommandHandle:
        h = AsyncCommandHandle(self._http, self._id, pid)
        if not from_start:
            o = await self._http.call(ops.output(self._id, pid, 2**62, 2**62, 0.0))
            h._f.out, h._f.err = o.out_offset, o.err_offset
        return h


class AsyncPty:
    def __init__(self, http: AsyncHTTP, sandbox_id: str) -> None:
        self._http = http
        self._id = sandbox_id

    async def create(self, *, rows: int = 24, cols: int = 80,
                     cmd: str | Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                     cwd: str | None = None, user: str | None = None,
                     timeout: float | None = None) -> AsyncPtyHandle:
        pid = await self._http.call(ops.spawn(self._id, cmd, env=env, cwd=cwd, timeout=timeout,
                                              stdin=None, keep_stdin=True, lossless=True,
                                              user=user, pty=(rows, cols)))
        return AsyncPtyHandle(self._http, self._id, pid)

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        await self._http.call(ops.resize(self._id, pid, rows, cols))

    async def send_stdin(self, pid: int, data: bytes | str) -> None:
        await send_stdin(self._http, self._id, pid, data)

    async def kill(self, pid: int, signal: int = 9) -> None:
        await self._http.call(ops.signal(self._id, pid, signal))
