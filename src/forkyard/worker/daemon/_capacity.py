"""How many VMs this worker runs, and the slots a boot must hold to start one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from forkyard.errors import InsufficientCapacity
from forkyard.wire.lifecycle import BUSY
from forkyard.worker import Worker

__all__ = ["Capacity", "free_memory_mb"]


def free_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Capacity:
    """VM slots: sandboxes that occupy a VM plus boots still in flight, at most ``limit``."""

    def __init__(self, worker: Worker, limit: int, *, on_release: Callable[[], None]) -> None:
        self.worker = worker
        self.limit = limit
        self._on_release = on_release
        self._lock = threading.Lock()
        self._reserved = 0  # slots promised to requests still booting

    def drain(self) -> None:
        """Take no more boots (shutting down); reports show the worker as full."""
        with self._lock:
            self.limit = 0

    def running(self) -> int:
        return sum(1 for sb in self.worker.list() if sb.state in BUSY)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one VM slot for a boot, or refuse (InsufficientCapacity) when full."""
        with self._lock:
            if self.running() + self._reserved >= self.limit:
                raise InsufficientCapacity(
                    f"worker {self.worker.name} is full ({self.limit} sandboxes)",
                    worker=self.worker.name, resource="sandboxes", limit=self.limit)
            self._reserved += 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= 1
            self._on_release()
