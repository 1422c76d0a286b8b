"""One background asyncio loop for every QMP connection of the process.

The worker library is synchronous (its callers are threads: the HTTP server's
pool, tests, the CLI) while ``qemu.qmp`` is asyncio; running one loop in a
daemon thread and submitting coroutines to it keeps both sides simple.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_sync"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="forkyard-qmp", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
    """Run ``coro`` on the shared loop; on timeout cancel it and raise TimeoutError."""
    fut = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise TimeoutError from None
