"""Synchronous QMP over ``qemu.qmp``, with forkyard's errors.

The connection is one end of a socketpair whose other end QEMU received at
start (``-chardev socket,fd=N``): no socket path to race on or leak, and
nobody but the owner can reach the monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from forkyard.errors import VMError
from forkyard.vm._loop import run_sync

__all__ = ["QMP", "QMPCommandError", "io_error_reason"]

Event = dict[str, Any]


def io_error_reason(event: dict[str, Any]) -> str | None:
    """What a ``BLOCK_IO_ERROR`` event says went wrong on the host; None for other events."""
    if event.get("event") != "BLOCK_IO_ERROR":
        return None
    data = event.get("data") or {}
    why = str(data.get("reason") or "I/O error")
    if data.get("nospace"):
        why += " (the host's filesystem is full)"
    return f"guest disk {data.get('operation', 'access')} failed on the host: {why}"


class QMPCommandError(VMError):
    """QEMU refused a QMP command; ``error_class`` is QMP's class name."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


class QMP:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._name = name
        self._client = QMPClient(name)
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._pump: asyncio.Task[None] | None = None
        self._watchers: list[Callable[[Event], None]] = []

    def watch(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every event, on the QMP loop thread.

        It must not block nor call back into QMP (hand work to a thread).
        """
        self._watchers.append(callback)

    def connect(self, timeout: float = 30.0) -> None:
        async def go() -> None:
            await self._client.connect(self._sock)
            self._pump = asyncio.get_running_loop().create_task(self._collect())

        try:
            run_sync(go(), timeout)
        except TimeoutError as exc:
            raise VMError(f"{self._name}: no QMP greeting within {timeout:g}s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise VMError(f"{self._name}: QMP connection failed: {exc}") from exc

    async def _collect(self) -> None:
        with self._client.listener() as listener:
            async for event in listener:
                ev = cast(Event, dict(event))
                with self._cond:
                    self._events.append(ev)
                    self._cond.notify_all()
                for callback in self._watchers:
                    callback(ev)

    def execute(self, command: str, args: dict[str, Any] | None = None, *,
                timeout: float = 60.0) -> Any:
        try:
            return run_sync(self._client.execute(command, args), timeout)
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise VMError(f"{self._name}: QMP {command} did not answer in {timeout:g}s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise VMError(f"{self._name}: QMP {command} failed: {exc!r}") from exc

    def hmp(self, command_line: str, *, timeout: float = 120.0) -> str:
        """A human monitor command; HMP reports errors as text, so callers check it."""
        out = self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        return str(out)

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under ``name`` (QMP ``getfd``)."""

        async def go() -> None:
            self._client.send_fd_scm(fd)
            await self._client.execute("getfd", {"fdname": name})

        try:
            run_sync(go(), 30.0)
        except ExecuteError as exc:
            raise QMPCommandError("getfd", exc.error_class, str(exc)) from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise VMError(f"{self._name}: passing a file descriptor failed: {exc!r}") from exc

    def add_fd(self, fd: int, fdset_id: int) -> None:
        """Put ``fd`` into QEMU's fd set ``fdset_id`` (QMP ``add-fd``): a file it
        then opens as ``/dev/fdset/<id>`` without any access to its path."""

        async def go() -> None:
            self._client.send_fd_scm(fd)
            await self._client.execute("add-fd", {"fdset-id": fdset_id})

        try:
            run_sync(go(), 30.0)
        except ExecuteError as exc:
            raise QMPCommandError("add-fd", exc.error_class, str(exc)) from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise VMError(f"{self._name}: passing a file descriptor failed: {exc!r}") from exc

    def event_mark(self) -> int:
        with self._cond:
            return len(self._events)

    def wait_event(
        self, accept: Callable[[Event], bool], *, since: int, timeout: float
    ) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events[since:]:
                    if accept(ev):
                        return ev
                since = len(self._events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMError(f"{self._name}: expected QMP event did not come in {timeout:g}s")
                self._cond.wait(left)

    def close(self) -> None:
        async def go() -> None:
            if self._pump is not None:
                self._pump.cancel()
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._client.disconnect()

        with contextlib.suppress(TimeoutError, QMPError, OSError, EOFError):
            run_sync(go(), 10.0)
        self._sock.close()
