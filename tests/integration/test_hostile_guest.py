"""A hostile guest against a real worker: floods of console, stdout and directory entries.

The worker runs in this process, so its RSS is this process's: a sampler
thread records the peak while the guest attacks.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkyard.errors import VMError
from forkyard.guest.client import DEFAULT_LIST_ENTRIES, DEFAULT_MAX_OUTPUT
from forkyard.vm import console

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
# the exec reply limit the host applies for the default max_output (stdout + stderr + fields)
EXEC_REPLY_LIMIT = 2 * DEFAULT_MAX_OUTPUT + 64 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class RssPeak:
    """Peak RSS growth of this process (the worker) while the block runs."""

    def __init__(self) -> None:
        gc.collect()
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


@contextlib.contextmanager
def console_cap(cap: int) -> Iterator[None]:
    """Boot what is created inside with a console ring of ``cap`` bytes."""
    old = os.environ.get("FORKYARD_CONSOLE_CAP")
    os.environ["FORKYARD_CONSOLE_CAP"] = str(cap)
    try:
        yield
    finally:
        if old is None:
            del os.environ["FORKYARD_CONSOLE_CAP"]
        else:
            os.environ["FORKYARD_CONSOLE_CAP"] = old


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from forkyard.worker import Worker
    from tests.conftest import _wait_gone

    root = tmp_path_factory.mktemp("hostile")
    w = Worker(root / "home", name="hostile")
    yield w
    w.close()
    leaked = _wait_gone(root)
    assert not leaked, f"QEMU processes left behind: {leaked}"


@pytest.fixture(scope="module")
def bystander(worker: object) -> object:
    """A sandbox that shares the worker with the attackers and must keep working.

    768 MiB: the 200k-file directory lives on a tmpfs (the minimal image's
    ext4 has far fewer free inodes), ~200 MB of inodes and dentries.
    """
    return worker.create("minimal", memory_mb=768)  # type: ignore[attr-defined]


def ring_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, console.older(path)) if p.exists())


def flood_console_then_reboot(worker: object, bystander: object, *, size: int, cap: int,
                              timeout: float) -> None:
    with console_cap(cap):
        sb = worker.create("minimal", cold=True)  # type: ignore[attr-defined]
    # earlier creates' template publishes run in the background: not the flood's memory
    worker.wait_background()  # type: ignore[attr-defined]
    vm = sb.vm
    path = vm.console_path
    # through the shell and tr: a stream of 'x', not NULs (the tty would pass those too)
    sb.exec(f"head -c {size} /dev/zero | tr '\\0' x > /dev/ttyS0; reboot -f", background=True)
    worst_disk = 0
    with RssPeak() as mem:
        deadline = time.monotonic() + timeout
        while vm.alive():
            assert time.monotonic() < deadline, "the guest never finished its flood"
            worst_disk = max(worst_disk, ring_bytes(path))
            time.sleep(0.2)
    worst_disk = max(worst_disk, ring_bytes(path))
    assert worst_disk <= cap, f"console held {worst_disk} bytes on disk, cap {cap}"
    # the ring really was fed: its newest bytes are the flood's end (then the kernel's
    # "reboot: Restarting system")
    assert b"x" * 4096 in console.ring_tail(path, 8192)
    assert worst_disk >= cap // 2
    assert mem.growth < 16 * MiB, f"worker RSS grew {mem.growth} bytes during the flood"

    t0 = time.monotonic()
    with pytest.raises(VMError) as e:
        sb.exec("true")
    assert time.monotonic() - t0 < 5.0
    # the error carries a bounded log tail, not the console
    assert len(str(e.value)) < 64 * 1024
    assert sb.state.value == "failed"
    assert bystander.exec("echo still-here").stdout == "still-here\n"  # type: ignore[attr-defined]
    sb.destroy()


def test_console_flood_then_reboot_small(worker, bystander):
    # a UART under TCG moves ~1 MB/s (less on a busy host): small here, 64 MiB below
    flood_console_then_reboot(worker, bystander, size=2 * MiB, cap=256 * 1024, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_console_flood_of_64_mib_then_reboot(worker, bystander):
    flood_console_then_reboot(worker, bystander, size=64 * MiB,
                              cap=console.DEFAULT_CAP, timeout=1200)


def test_200_mb_of_stdout_is_cut_at_max_output(bystander):
    sb = bystander
    sb.exec("true")  # warm: the first call's allocations are not the reply's
    with RssPeak() as mem:
        r = sb.exec("dd if=/dev/zero bs=1M count=200 2>/dev/null; echo done >&2", timeout=300)
    assert r.truncated and r.exit_code == 0
    assert len(r.stdout_bytes) == DEFAULT_MAX_OUTPUT and r.stderr == "done\n"
    assert mem.growth < 2 * EXEC_REPLY_LIMIT, f"worker RSS grew {mem.growth} bytes"
    assert sb.exec("echo ok").stdout == "ok\n"


def _fill(sb: object, path: str, count: int) -> None:
    r = sb.exec(  # type: ignore[attr-defined]
        f"mkdir -p {path} && mount -t tmpfs -o nr_inodes=0,size=16m tmpfs {path} && "
        f"cd {path} && seq 1 {count} | xargs touch && ls | wc -l", timeout=900)
    assert r.stdout.strip() == str(count), r.stderr[-2000:]


def _listing_is_capped(sb: object, path: str) -> None:
    with RssPeak() as mem:
        listing = sb.files.list(path)  # type: ignore[attr-defined]
    assert listing.truncated and len(listing) == DEFAULT_LIST_ENTRIES
    assert len({e.name for e in listing}) == DEFAULT_LIST_ENTRIES
    # the reply is ~32 bytes an entry; its Python objects ~200: well under the frame limit x2
    limit = DEFAULT_LIST_ENTRIES * (6 + 20 + 255) + 64 * 1024
    assert mem.growth < 2 * limit, f"worker RSS grew {mem.growth} bytes"
    small = sb._agent.list(path, limit=10)  # type: ignore[attr-defined]
    assert small.truncated and len(small) == 10


def test_a_directory_over_the_cap_is_listed_truncated(bystander):
    _fill(bystander, "/mnt/d12k", 12_000)
    _listing_is_capped(bystander, "/mnt/d12k")
    assert not bystander.files.list("/mnt").truncated


@pytest.mark.slow
def test_a_directory_of_200k_files_is_listed_bounded(bystander):
    _fill(bystander, "/mnt/d200k", 200_000)
    _listing_is_capped(bystander, "/mnt/d200k")
