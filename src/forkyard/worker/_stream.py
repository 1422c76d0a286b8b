"""Load a VM state into QEMU while it is still downloading.

A fork on a worker that lacks the checkpoint's VM state would otherwise
download it, then have QEMU read it back: two sequential passes over the
largest part.  Here the bytes go to the blob cache and, through a pipe, to a
*paused* QEMU at the same time.  The VM only runs after the download was
verified against the manifest's digest (:meth:`StateStream.finish`); on a
mismatch the paused VM is killed and the cache never sees the bytes — nothing
runs on bad data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from forkyard._fs import atomic_write
from forkyard.checkpoint import PartRef
from forkyard.errors import ForkyardError
from forkyard.store import BlobCache, BlobStore

__all__ = ["StateStream"]


class StateStream:
    def __init__(self, cache: BlobCache, blobs: BlobStore, ref: PartRef,
                 on_done: Callable[[], None] | None = None) -> None:
        self._cache = cache
        self._blobs = blobs
        self._ref = ref
        self._on_done = on_done
        self._done = threading.Event()  # set once the bytes are filed in the cache (or failed)
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._error: BaseException | None = None
        self._verdict = threading.Event()  # set once the bytes are verified (or failed)
        self._path: Path | None = None
        read_fd, self._write_fd = os.pipe()
        with contextlib.suppress(OSError):  # fewer wake-ups of QEMU and of us
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.read_fd: int | None = read_fd
        self._download = threading.Thread(target=self._run_download, daemon=True,
                                          name=f"fetch-{ref.digest[:12]}")
        self._feeder = threading.Thread(target=self._run_feeder, daemon=True,
                                        name=f"feed-{ref.digest[:12]}")

    def start(self) -> None:
        self._download.start()
        self._feeder.start()

    def take_fd(self) -> int:
        """The pipe's read end; the caller (QEMU's launcher) now owns and closes it."""
        fd = self.read_fd
        if fd is None:
            raise ForkyardError("state stream already handed over")
        self.read_fd = None
        return fd

    def finish(self, timeout: float) -> None:
        """Wait for the verdict on the downloaded bytes; a failure is raised here.

        Filing the bytes in the blob cache (fsync, link) continues in the
        background: the VM need not wait for the disk.
        """
        if not self._verdict.wait(timeout):
            raise ForkyardError(f"VM state {self._ref.digest[:12]} still downloading "
                                f"after {timeout:g}s")
        if self._error is not None:
            raise self._error

    def wait_done(self, timeout: float) -> bool:
        """Wait until the download is over: filed in the cache, or failed."""
        return self._done.wait(timeout)

    def close(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def _run_download(self) -> None:
        digest = self._ref.digest
        tmp: Path | None = None
        try:
            # Keep the chunks in memory and write the cache file only after the
            # verdict: the disk write is then off the path to a running VM.
            kept: list[bytes] = []
            sink = _Collector(kept, self._chunks.put)
            self._blobs.read_blob_into(digest, cast(BinaryIO, sink), size=self._ref.size)
            self._chunks.put(None)
            self._verdict.set()  # verified: the paused VM may run
            # a name of our own: the cache links it in, then it goes
            tmp = self._cache.root / ".streams" / f"{digest[:16]}.{os.getpid()}.{id(self):x}"
            # fsync'd: cache entries are trusted without re-hashing
            with atomic_write(tmp) as f:
                for chunk in kept:
                    f.write(chunk)
                kept.clear()
            self._path = self._cache.add_local(digest, tmp, verify=False, link=True)
        except BaseException as exc:
            if not self._verdict.is_set():
                self._error = exc
            self._chunks.put(None)
            self._verdict.set()
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if self._on_done is not None:
                self._on_done()
            self._done.set()

    def _run_feeder(self) -> None:
        try:
            while (chunk := self._chunks.get()) is not None:
                _write_all(self._write_fd, chunk)
        except OSError:
            pass  # QEMU stopped reading (it failed); the launcher reports why
        finally:
            with contextlib.suppress(OSError):
                os.close(self._write_fd)


class _Collector:
    """A write-only "file" that keeps every chunk and hands it to a callback."""

    def __init__(self, kept: list[bytes], put: Callable[[bytes], None]) -> None:
        self._kept = kept
        self._put = put

    def write(self, data: bytes) -> int:
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._kept.append(chunk)
        self._put(chunk)
        return len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
