"""The console ring without QEMU: a writer on the other end of its socket plays the guest."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from forkyard.vm import console
from forkyard.vm.console import MIN_CAP, ConsoleRing, default_cap, file_tail, ring_tail

KiB = 1024


def feed(ring: ConsoleRing, chunks: list[bytes]) -> None:
    """Write through the fd QEMU would get, then close it like QEMU exiting."""
    qemu_end = socket.socket(fileno=os.dup(ring.qemu_fd()))
    ring.start()
    with qemu_end:
        for c in chunks:
            qemu_end.sendall(c)
    ring.close(timeout=10)


def on_disk(path: Path) -> int:
    return sum(q.stat().st_size for q in (path, console.older(path)) if q.exists())


def test_the_ring_stays_under_its_cap_and_keeps_the_newest_output(tmp_path: Path):
    path = tmp_path / "console.log"
    ring = ConsoleRing(path, cap=256 * KiB)
    lines = [b"line %07d\n" % i for i in range(200_000)]  # ~2.4 MB through a 256 KiB ring
    feed(ring, [b"".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)])
    assert on_disk(path) <= 256 * KiB
    kept = console.older(path).read_bytes() + path.read_bytes()
    assert len(kept) >= 128 * KiB  # at least half the cap of history
    assert kept.endswith(lines[-1])  # the newest byte is there, in order
    assert kept in b"".join(lines[-30_000:])


def test_a_restarted_vm_appends_to_the_same_ring(tmp_path: Path):
    path = tmp_path / "console.log"
    feed(ConsoleRing(path, cap=MIN_CAP), [b"a" * (40 * KiB)])
    feed(ConsoleRing(path, cap=MIN_CAP), [b"b" * (40 * KiB)])
    assert on_disk(path) <= MIN_CAP
    assert ring_tail(path, 10) == b"b" * 10


def test_tails_read_only_their_bound(tmp_path: Path):
    path = tmp_path / "console.log"
    console.older(path).write_bytes(b"old" * 1000 + b"OLD")
    path.write_bytes(b"new")
    assert ring_tail(path, 6) == b"OLDnew"
    assert ring_tail(path, 2) == b"ew"
    assert file_tail(tmp_path / "missing", 100) == b""
    big = tmp_path / "big.log"
    with open(big, "wb") as f:  # sparse: 1 GiB, read nothing but the tail
        f.truncate(1 << 30)
        f.seek((1 << 30) - 4)
        f.write(b"tail")
    t = time.monotonic()
    assert file_tail(big, 4) == b"tail"
    assert time.monotonic() - t < 0.5


def test_close_without_start_and_cap_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ConsoleRing(tmp_path / "c.log").close()  # a launch that failed before QEMU ran
    monkeypatch.setenv("FORKYARD_CONSOLE_CAP", str(1 << 20))
    assert default_cap() == 1 << 20 and ConsoleRing(tmp_path / "c.log").cap == 1 << 20
    monkeypatch.setenv("FORKYARD_CONSOLE_CAP", "1")
    assert default_cap() == MIN_CAP
    monkeypatch.setenv("FORKYARD_CONSOLE_CAP", "lots")
    assert default_cap() == console.DEFAULT_CAP
