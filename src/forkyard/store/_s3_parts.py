"""Multipart uploads: slicing a stream into parts and sending them, a few at a time.

At most ``concurrency`` parts are in memory or in flight at once, whatever
the size of the object, and a part size grows so that any object fits in
S3's 10,000 parts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from forkyard.errors import StoreError
from forkyard.store._base import ProgressFn, Readable

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["MAX_PARTS", "MIN_PART_SIZE", "MiB", "chunks", "part_size_for", "read_full",
           "upload_parts"]

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000


def part_size_for(total: int | None, part_size: int) -> int:
    """``part_size``, grown (in whole MiB) when ``total`` would need more than MAX_PARTS."""
    if total is None:
        return part_size
    needed = -(-total // MAX_PARTS)  # ceil: S3 allows at most 10,000 parts
    return max(part_size, -(-needed // MiB) * MiB)


def upload_parts(
    send: Callable[[int, bytes], str],
    parts_in: Iterator[bytes],
    *,
    key: str,
    concurrency: int,
    total: int | None,
    progress: ProgressFn | None,
    boundary: Callable[[str, str], AbstractContextManager[None]],
) -> list[CompletedPartTypeDef]:
    """Upload parts with at most ``concurrency`` in flight (bounds memory).

    ``send(number, data)`` uploads one part and returns its ETag; its errors
    are translated by ``boundary`` as they are collected.
    """
    parts: list[CompletedPartTypeDef] = []
    pending: deque[tuple[Future[str], int, int]] = deque()
    done = 0

    def settle() -> None:
        nonlocal done
        future, number, size = pending.popleft()
        with boundary("UploadPart", key):
            parts.append({"ETag": future.result(), "PartNumber": number})
        done += size
        if progress is not None:
            progress(done, total)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="forkyard-s3") as pool:
        try:
            for number, chunk in enumerate(parts_in, start=1):
                if number > MAX_PARTS:
                    raise StoreError(f"{key!r} needs more than {MAX_PARTS} parts")
                if len(pending) >= concurrency:
                    settle()
                future = pool.submit(send, number, chunk)
                pending.append((future, number, len(chunk)))
            while pending:
                settle()
        except BaseException:
            for future, _, _ in pending:
                future.cancel()
            raise
    return parts


def read_full(src: Readable, n: int) -> bytes:
    """Read exactly ``n`` bytes unless EOF comes first (streams may return short reads)."""
    first = src.read(n)
    if len(first) >= n or not first:
        return first
    buf = bytearray(first)
    while len(buf) < n and (more := src.read(n - len(buf))):
        buf += more
    return bytes(buf)


def chunks(head: deque[bytes], src: Readable, part_size: int) -> Iterator[bytes]:
    last = len(head[-1]) if head else part_size
    while head:
        yield head.popleft()  # popping lets finished parts be freed early
    if last < part_size:
        return
    while chunk := read_full(src, part_size):
        yield chunk
        if len(chunk) < part_size:
            return
