"""Doing one thing inside a network namespace from a threaded worker.

Python 3.11 has no ``os.setns``; ``setns(2)`` through ctypes changes the
namespace of the calling *thread* only (a network namespace is per task).
So every step runs in a short thread of its own that enters the namespace,
creates what it needs (a socket, a TAP fd, a /proc/sys write) and ends:
nothing else in the worker ever runs in a sandbox's namespace, and no thread
has to find its way back.  A socket or TAP fd keeps the namespace it was
created in for its whole life, whichever thread uses it later.  (A child
process per step would work too, but costs a fork of the whole worker and
an fd pass.)
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["NETNS_DIR", "in_netns", "open_tap", "sysctl", "tcp_socket", "udp_socket"]

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts each namespace
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a fresh thread inside namespace ``name``; its result or exception."""
    box: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return box[0]


def open_tap(netns: str, ifname: str) -> int:
    """An fd of the persistent TAP ``ifname`` in ``netns``, for QEMU's ``-netdev tap,fd=``."""

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        return fd

    return in_netns(netns, attach)


def sysctl(netns: str, values: dict[str, str]) -> None:
    """Write ``/proc/sys`` keys (``net/ipv4/ip_forward``) as seen from inside ``netns``."""

    def write() -> None:
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    in_netns(netns, write)


def tcp_socket(netns: str) -> socket.socket:
    return in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


def udp_socket(netns: str, bind: tuple[str, int]) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(bind)
        except BaseException:
            s.close()
            raise
        return s

    return in_netns(netns, make)
