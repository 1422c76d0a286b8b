"""The resolver every sandbox's guest uses (10.0.2.3:53), honouring domain rules.

One thread of the worker serves a UDP socket per sandbox (each bound inside
that sandbox's namespace, so it is reachable only from its guest) and
forwards queries to the configured upstream from the host's namespace:

- a name matching a ``deny_out`` domain (``example.com`` or ``*.example.com``
  forms: a rule covers the name and its subdomains) is answered NXDOMAIN;
- other queries go upstream with a fresh transaction id, and the answer is
  relayed back; the A records of a name matching an ``allow_out`` domain are
  added to that sandbox's ``dns_allow`` set for their TTL (clamped), which
  opens them even inside ranges denied by default.

Bounded whatever a guest sends: queries over 512 bytes or not a single
question are dropped, each sandbox gets ``RATE`` queries a second (burst
``BURST``), at most ``PER_SANDBOX`` of its queries wait upstream and
``MAX_PENDING`` in all, each for ``TIMEOUT`` seconds.  Only UDP is served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkyard.wire.network import NetworkSpec

__all__ = ["Resolver", "answers_a", "matches", "question", "upstream_from_resolv_conf"]

log = logging.getLogger("forkyard.net")

MAX_QUERY = 512
MAX_REPLY = 4096
RATE, BURST = 50.0, 100.0
PER_SANDBOX = 32
MAX_PENDING = 1024
TIMEOUT = 3.0
_HDR = struct.Struct("!HHHHHH")
_TYPE_A = 1


def upstream_from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> tuple[str, int]:
    """The host's first IPv4 nameserver (127.0.0.53 and the like work: we ask from the host)."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return parts[1], 53
    return "127.0.0.1", 53


def _name(msg: bytes, off: int) -> tuple[str, int]:
    """A (possibly compressed) domain name at ``off``; its text and the offset after it."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # pointer loops end here
        if off >= len(msg):
            raise ValueError("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise ValueError("truncated pointer")
            if end < 0:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            continue
        if n == 0:
            return ".".join(labels).lower(), (end if end >= 0 else off + 1)
        if n > 63 or off + 1 + n > len(msg):
            raise ValueError("bad label")
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    raise ValueError("name too long")


def question(msg: bytes) -> tuple[int, str, int]:
    """A query's (id, name, end of its question); ValueError unless exactly one question."""
    if len(msg) < _HDR.size:
        raise ValueError("short")
    qid, flags, qd, _an, _ns, _ar = _HDR.unpack_from(msg)
    if flags & 0x8000 or qd != 1:
        raise ValueError("not one query")
    name, off = _name(msg, _HDR.size)
    if off + 4 > len(msg):
        raise ValueError("truncated question")
    return qid, name, off + 4


def answers_a(msg: bytes) -> list[tuple[str, int]]:
    """The A records (address, TTL) of a reply's answer section."""
    _qid, _flags, qd, an, _ns, _ar = _HDR.unpack_from(msg)
    off = _HDR.size
    for _ in range(qd):
        _n, off = _name(msg, off)
        off += 4
    out: list[tuple[str, int]] = []
    for _ in range(min(an, 64)):
        _n, off = _name(msg, off)
        if off + 10 > len(msg):
            break
        rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
        off += 10
        if rtype == _TYPE_A and rdlen == 4 and off + 4 <= len(msg):
            out.append((socket.inet_ntoa(msg[off:off + 4]), ttl))
        off += rdlen
    return out


def matches(name: str, rules: list[str]) -> bool:
    """Whether ``name`` is one of ``rules`` or under one (``*.x`` and ``x`` both cover x's
    subdomains; ``x`` covers x itself too)."""
    name = name.rstrip(".").lower()
    for rule in rules:
        base = rule.removeprefix("*.")
        if name.endswith("." + base) or (name == base and not rule.startswith("*.")):
            return True
    return False


def _nxdomain(query: bytes, end: int) -> bytes:
    qid, flags = struct.unpack_from("!HH", query)
    rd = flags & 0x0100
    return _HDR.pack(qid, 0x8000 | 0x0400 | rd | 0x0080 | 3, 1, 0, 0, 0) + query[_HDR.size:end]


@dataclass
class _Box:
    sock: socket.socket
    allow: list[str]
    deny: list[str]
    tokens: float = BURST
    stamp: float = field(default_factory=time.monotonic)
    pending: int = 0


@dataclass(frozen=True, slots=True)
class _Pending:
    netns: str
    client: tuple[str, int]
    qid: int
    name: str
    deadline: float


class Resolver:
    """The forwarding resolver of all of a worker's sandboxes (one thread)."""

    def __init__(self, upstream: tuple[str, int],
                 on_allowed: Callable[[str, list[tuple[str, int]]], None]) -> None:
        self.upstream = upstream
        self._on_allowed = on_allowed
        self._sel = selectors.DefaultSelector()
        self._boxes: dict[str, _Box] = {}
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._up.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._up, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="forkyard-dns", daemon=True)
        self._thread.start()

    def add(self, netns: str, sock: socket.socket, spec: NetworkSpec) -> None:
        sock.setblocking(False)
        with self._lock:
            self._boxes[netns] = _Box(sock, spec.domains("allow_out"), spec.domains("deny_out"))
            self._sel.register(sock, selectors.EVENT_READ, netns)
        self._poke()

    def update(self, netns: str, spec: NetworkSpec) -> None:
        with self._lock:
            box = self._boxes.get(netns)
            if box is not None:
                box.allow, box.deny = spec.domains("allow_out"), spec.domains("deny_out")

    def remove(self, netns: str) -> None:
        with self._lock:
            box = self._boxes.pop(netns, None)
            if box is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(box.sock)
        self._poke()

    def close(self) -> None:
        self._closed = True
        self._poke()
        self._thread.join(5)
        self._up.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------
    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._sel.select(timeout=1.0)
            except (OSError, ValueError):
                time.sleep(0.05)  # a socket closed under us; the next select is clean
                continue
            for key, _ in events:
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif key.data is None:
                    self._from_upstream()
                else:
                    self._from_guest(str(key.data))
            self._expire()

    def _from_guest(self, netns: str) -> None:
        with self._lock:
            box = self._boxes.get(netns)
        if box is None:
            return
        for _ in range(16):  # a bounded batch per wakeup: one guest cannot starve the others
            try:
                data, client = box.sock.recvfrom(MAX_QUERY + 1)
            except (BlockingIOError, OSError):
                return
            now = time.monotonic()
            box.tokens = min(BURST, box.tokens + (now - box.stamp) * RATE)
            box.stamp = now
            if box.tokens < 1 or len(data) > MAX_QUERY:
                continue
            box.tokens -= 1
            try:
                qid, name, end = question(data)
            except ValueError:
                continue
            if matches(name, box.deny):
                with contextlib.suppress(OSError):
                    box.sock.sendto(_nxdomain(data, end), client)
                continue
            if box.pending >= PER_SANDBOX or len(self._pending) >= MAX_PENDING:
                continue
            up_id = self._new_id()
            self._pending[up_id] = _Pending(netns, client, qid, name, now + TIMEOUT)
            box.pending += 1
            try:
                self._up.sendto(struct.pack("!H", up_id) + data[2:], self.upstream)
            except OSError:
                self._finish(up_id)

    def _new_id(self) -> int:
        while True:
            n = secrets.randbelow(65536)
            if n not in self._pending:
                return n

    def _finish(self, up_id: int) -> _Pending | None:
        p = self._pending.pop(up_id, None)
        if p is not None:
            box = self._boxes.get(p.netns)
            if box is not None:
                box.pending -= 1
        return p

    def _from_upstream(self) -> None:
        for _ in range(64):
            try:
                data, src = self._up.recvfrom(MAX_REPLY)
            except (BlockingIOError, OSError):
                return
            if src[0] != self.upstream[0] or len(data) < _HDR.size:
                continue
            p = self._finish(struct.unpack_from("!H", data)[0])
            if p is None:
                continue
            with self._lock:
                box = self._boxes.get(p.netns)
            if box is None:
                continue
            if matches(p.name, box.allow):
                try:
                    found = answers_a(data)
                except (ValueError, struct.error):
                    found = []
                if found:
                    # before the guest sees the answer: its first packet must pass
                    self._on_allowed(p.netns, found)
            with contextlib.suppress(OSError):
                box.sock.sendto(struct.pack("!H", p.qid) + data[2:], p.client)

    def _expire(self) -> None:
        now = time.monotonic()
        for up_id in [k for k, p in self._pending.items() if p.deadline < now]:
            self._finish(up_id)
