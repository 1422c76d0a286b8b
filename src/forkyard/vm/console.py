"""The guest's serial console: a capped ring on disk, read only as a bounded tail.

The guest owns its serial port and may write to it without end (``cat
/dev/zero > /dev/ttyS0``), so nothing on the host may grow with it.

How: QEMU's 16550 UART (``-serial chardev:console``) writes to a ``socket``
chardev whose other end, one half of a socketpair made before QEMU starts,
is read by one host thread per VM.  That thread appends to ``console.log``;
when the file reaches half the cap it becomes ``console.log.1`` (replacing
the older half) and a new ``console.log`` starts.  The two files never hold
more than the cap together and always hold the newest output: between half
the cap and all of it.  Readers take a bounded tail (:func:`ring_tail`),
never a whole file.

Backpressure: if the thread falls behind, the socket buffer fills, QEMU's
serial device waits for the chardev to become writable before it takes the
next byte, and the guest's UART simply stalls.  Neither QEMU nor the worker
buffers more than a socket buffer and one read.

Why not QEMU's ``ringbuf`` chardev: that ring lives in QEMU's memory and dies
with QEMU, so the console of a guest that panicked or ran ``reboot -f`` (the
one a post-mortem needs) would be gone, and reading it means QMP round trips
that compete with checkpoints for the monitor.

Saved VM states are unaffected: a chardev backend is not part of the
migration stream; the serial device it feeds (the same ``isa-serial``) is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import threading
from pathlib import Path

__all__ = ["DEFAULT_CAP", "MIN_CAP", "ConsoleRing", "default_cap", "file_tail", "ring_tail"]

log = logging.getLogger("forkyard.vm")

DEFAULT_CAP = 4 * 1024 * 1024
MIN_CAP = 64 * 1024
_ENV = "FORKYARD_CONSOLE_CAP"  # bytes; a worker-wide override of DEFAULT_CAP
_READ = 64 * 1024


def default_cap() -> int:
    raw = os.environ.get(_ENV)
    if not raw:
        return DEFAULT_CAP
    try:
        cap = int(raw)
    except ValueError:
        log.warning("%s=%r is not a number of bytes; using %d", _ENV, raw, DEFAULT_CAP)
        return DEFAULT_CAP
    return max(cap, MIN_CAP)


def older(path: Path) -> Path:
    """The ring's previous half."""
    return path.with_name(path.name + ".1")


class ConsoleRing:
    """The host end of one VM's console: :meth:`qemu_fd` to QEMU, then :meth:`start`."""

    def __init__(self, path: Path, cap: int | None = None) -> None:
        self.path = path
        self.cap = max(cap if cap is not None else default_cap(), MIN_CAP)
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread: threading.Thread | None = None

    def qemu_fd(self) -> int:
        """The fd QEMU inherits (``-chardev socket,id=console,fd=N``)."""
        return self._theirs.fileno()

    def start(self) -> None:
        """QEMU holds its end now: drop ours of it and start copying."""
        self._theirs.close()
        self._thread = threading.Thread(target=self._run, name=f"console-{self.path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Wait for the copy to end (QEMU gone: EOF), then make sure it has."""
        self._theirs.close()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._ours.shutdown(socket.SHUT_RDWR)
            if self._thread is not None:
                self._thread.join(timeout)
        self._ours.close()

    def _run(self) -> None:
        half = self.cap // 2
        try:
            out: io.FileIO | None = open(self.path, "ab", buffering=0)  # noqa: SIM115
        except OSError as exc:
            log.warning("console %s: %s; the console is discarded", self.path, exc)
            out = None
        try:
            while True:
                try:
                    data = self._ours.recv(_READ)
                except OSError:
                    return
                if not data:
                    return
                if out is None:
                    continue  # keep reading: a full socket would stall the guest
                try:
                    out = self._append(out, data, half)
                except OSError as exc:
                    log.warning("console %s: %s; the console is discarded", self.path, exc)
                    out.close()
                    out = None
        finally:
            if out is not None:
                out.close()

    def _append(self, out: io.FileIO, data: bytes, half: int) -> io.FileIO:
        view = memoryview(data)
        while view:
            room = half - out.tell()
            if room <= 0:
                out.close()
                os.replace(self.path, older(self.path))
                out = open(self.path, "ab", buffering=0)  # noqa: SIM115
                continue
            n = out.write(view[:room]) or 0
            view = view[n:]
        return out


def file_tail(path: Path, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of a file, reading no more than that."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            return f.read(max_bytes)
    except OSError:
        return b""


def ring_tail(path: Path, max_bytes: int) -> bytes:
    """The newest ``max_bytes`` of a console ring (both halves)."""
    newest = file_tail(path, max_bytes)
    if len(newest) >= max_bytes:
        return newest
    return file_tail(older(path), max_bytes - len(newest)) + newest
