"""Host side of the guest agent channel.

One :class:`AgentClient` per sandbox connection.  Calls may come from many
threads at once: each gets a request id, a reader thread routes replies back,
and every call has a timeout, so a wedged guest produces
:class:`~forkyard.errors.AgentTimeout` instead of a hung host.

Every reply is bounded by the call that waits for it (see the ``protocol``
docstring): a reply over its call's limit fails that call with
:class:`~forkyard.errors.PayloadTooLarge` and is skipped unread, exec output is
cut at ``max_output`` here as well as in the guest, listings stop at a
maximum entry count (``Listing.truncated``), and ``read_file`` never returns
more than :data:`MAX_FILE_SIZE`.  The agent in the guest honours the same
limits; these checks are for the guest that does not.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence

from forkyard.errors import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    GuestError,
    GuestFileNotFound,
    PayloadTooLarge,
)
from forkyard.guest import protocol as p
from forkyard.guest._commands import DEFAULT_MAX_OUTPUT, MAX_OUTPUT, CommandOps, ExecResult
from forkyard.guest._fileops import (
    DEFAULT_LIST_ENTRIES,
    MAX_FILE_SIZE,
    MAX_LIST_ENTRIES,
    EntryInfo,
    FileOps,
    Listing,
)
from forkyard.guest.procs import Processes
from forkyard.guest.protocol import (
    SMALL_REPLY,
    Fields,
    Flag,
    Frame,
    FrameDecoder,
    Limit,
    Op,
    Oversized,
    Tag,
)

__all__ = [
    "DEFAULT_LIST_ENTRIES",
    "DEFAULT_MAX_OUTPUT",
    "MAX_FILE_SIZE",
    "MAX_LIST_ENTRIES",
    "MAX_OUTPUT",
    "AgentClient",
    "EntryInfo",
    "ExecResult",
    "Listing",
]

log = logging.getLogger("forkyard.agent")

class _Call:
    __slots__ = ("acked", "done", "error", "limit", "op", "reply")

    def __init__(self, op: Op, limit: Limit) -> None:
        self.op = op
        self.limit = limit
        self.acked = threading.Event()
        self.done = threading.Event()
        self.reply: Frame | None = None
        self.error: AgentError | None = None


class AgentClient(CommandOps, FileOps):
    """A connection to one guest agent over its virtio-serial unix socket."""

    def __init__(self, sock_path: str | os.PathLike[str], *, name: str = "sandbox") -> None:
        self._path = os.fspath(sock_path)
        self._name = name
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._calls: dict[int, _Call] = {}
        self._lock = threading.Lock()  # guards _calls and _closed
        self._send_lock = threading.Lock()
        self._gate = threading.Condition()
        self._quiesced = False
        self._closed = True
        self._ids = itertools.count(secrets.randbelow(1 << 30) + 1)
        self._decoder = FrameDecoder(self._limit_for)
        self._hello_id = 0
        self._broken: str | None = None  # why the reader gave up on the connection
        self._reset_lock = threading.Lock()
        self.version = ""
        self.reseeded = False  # whether the last HELLO reseeded the guest RNG

    # ------------------------------------------------------------------
    # connection
    def open(self, *, timeout: float = 60.0) -> None:
        """Connect the channel without starting a session yet.

        A restore connects this early, before QEMU loads the saved state, so
        that whatever QEMU flushes from the saved port state on load (a reply
        the source was still sending when it was paused) has a reader; the
        decoder skips it.  Defensive: QEMU 7.2 gives up on writes to an
        unconnected socket chardev and throttles the port, and we would rather
        not depend on how it recovers from that.
        """
        self._open(time.monotonic() + timeout)

    def connect(self, *, timeout: float = 60.0, set_time: bool = True,
                hello_timeout: float = 15.0) -> None:
        """Start a session (connecting first if needed): HELLO with a nonce.

        If HELLO goes unanswered for ``hello_timeout`` (doubling each time),
        the connection is dropped and made again.  Whatever the guest's end of
        the channel was left holding, it drops a stalled partial request after
        a few seconds (agent.c), so a later attempt gets through.  A fresh
        boot that takes longer than one attempt is unharmed.
        """
        deadline = time.monotonic() + timeout
        attempt = hello_timeout
        while True:
            if self._sock is None:
                self._open(deadline)
            left = deadline - time.monotonic()
            try:
                self._hello(set_time, timeout=max(0.1, min(attempt, left)))
                return
            except AgentTimeout:
                if deadline - time.monotonic() <= 0:
                    self.close()
                    raise AgentTimeout("hello", timeout) from None
                log.warning("%s: no answer to HELLO in %.0fs; reconnecting", self._name, attempt)
                self._drop()
                attempt *= 2

    def _open(self, deadline: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(self._path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    sock.close()
                    raise AgentDisconnected(f"{self._name}: agent socket not reachable") from exc
                time.sleep(0.02)
        self._sock = sock
        # Until the reply to our HELLO, everything on the channel belongs to an
        # earlier session: the decoder skips to that reply's header.
        self._hello_id = self._next_id()
        self._broken = None
        self._decoder = FrameDecoder(self._limit_for)
        self._decoder.sync_on(Op.HELLO, int(Flag.RESPONSE), self._hello_id)
        with self._lock:
            self._closed = False
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock, self._decoder), name=f"agent-{self._name}",
            daemon=True,
        )
        self._reader.start()

    def _hello(self, set_time: bool, *, timeout: float) -> None:
        nonce = secrets.token_bytes(16)
        fields: list[tuple[Tag, p.FieldValue]] = [(Tag.NONCE, nonce)]
        if set_time:
            # a fresh session follows a boot, fork or wake: every restore of one
            # memory image gets its own entropy (and the real clock)
            fields.append((Tag.TIME_NS, time.time_ns()))
            fields.append((Tag.SEED, secrets.token_bytes(p.SEED_BYTES)))
        reply = self._call(Op.HELLO, fields, timeout=timeout, request_id=self._hello_id)
        if reply.bytes(Tag.NONCE) != nonce:
            self.close()
            raise AgentError(f"{self._name}: agent answered HELLO with the wrong nonce")
        self.version = reply.str(Tag.VERSION)
        self.reseeded = bool(reply.int(Tag.RESEEDED))

    def _drop(self) -> None:
        """Close this connection only; the client stays usable for another."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._reader is not None:
            self._reader.join(5)
        with self._lock:
            self._calls.clear()

    def close(self) -> None:
        self._broken = None  # closed on purpose: nothing to reset
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            calls = list(self._calls.values())
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for call in calls:
            call.acked.set()
            call.done.set()

    @property
    def connected(self) -> bool:
        return not self._closed

    def _read_loop(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self._route(frame)
        except AgentProtocolError as exc:
            # framing is lost: nothing after this can be trusted to start a frame
            log.warning("%s: %s; closing the agent connection", self._name, exc)
            self._broken = str(exc)
        except OSError:
            pass
        finally:
            if self._sock is sock:  # not a connection that connect() already dropped
                self._shutdown()

    def _reset(self, timeout: float) -> None:
        """After a protocol violation: a fresh session before the next call.

        The guest drops its buffered input and output when we hang up, and a
        new session skips whatever was still in flight (the HELLO sync), so an
        agent that sent one bad frame is reachable again; a hostile one only
        fails its own calls.
        """
        with self._reset_lock:
            if self._broken is None or self._sock is not None:
                return
            log.warning("%s: reconnecting after a protocol error (%s)", self._name, self._broken)
            self.connect(timeout=min(timeout, 30.0), set_time=False)

    def _limit_for(self, op: int, flags: int, request_id: int) -> Limit | None:
        """The decoder's question for each header: how much may this frame hold?"""
        with self._lock:
            call = self._calls.get(request_id)
        if call is None:
            return None  # a reply to a request of an earlier session (before a restore)
        return Limit(0, 0) if op == Op.ACK else call.limit

    def _route(self, frame: Frame | Oversized) -> None:
        with self._lock:
            call = self._calls.get(frame.id)
        if call is None:
            return  # its call timed out meanwhile
        if isinstance(frame, Oversized):
            call.error = PayloadTooLarge(f"{call.op.name.lower()} reply", frame.length,
                                         frame.limit)
            call.acked.set()
            call.done.set()
            with self._gate:
                self._gate.notify_all()
            return
        if frame.op == Op.ACK:
            with self._gate:
                call.acked.set()
                self._gate.notify_all()
            return
        call.reply = frame
        call.acked.set()
        call.done.set()
        with self._gate:
            self._gate.notify_all()

    # ------------------------------------------------------------------
    # checkpoint support
    @contextlib.contextmanager
    def quiesced(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold new requests back and wait until the guest has read every request.

        Inside the block the guest has no partial request buffered, so the VM
        can be captured and a fork can open a fresh session on the channel.
        """
        deadline = time.monotonic() + timeout
        with self._gate:
            self._quiesced = True
            try:
                while not self._all_acked():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AgentTimeout("quiesce (waiting for request ACKs)", timeout)
                    self._gate.wait(left)
            except BaseException:
                self._quiesced = False
                self._gate.notify_all()
                raise
        try:
            yield
        finally:
            with self._gate:
                self._quiesced = False
                self._gate.notify_all()

    def _all_acked(self) -> bool:
        with self._lock:
            return all(c.acked.is_set() for c in self._calls.values())

    # ------------------------------------------------------------------
    # request/response
    def _next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or 1

    def _call(
        self,
        op: Op,
        fields: Sequence[tuple[Tag, p.FieldValue]],
        *,
        timeout: float,
        request_id: int | None = None,
        reply_limit: Limit = SMALL_REPLY,
    ) -> Fields:
        payload = p.encode_fields(fields)
        if len(payload) > p.MAX_PAYLOAD:
            raise PayloadTooLarge(f"{op.name.lower()} request", len(payload), p.MAX_PAYLOAD)
        if self._broken is not None and request_id is None:  # (not the session HELLO)
            self._reset(timeout)
        rid = request_id if request_id is not None else self._next_id()
        deadline = time.monotonic() + timeout
        call = _Call(op, reply_limit)
        with self._gate:
            while self._quiesced:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentTimeout(op.name.lower(), timeout)
                self._gate.wait(left)
            with self._lock:
                if self._closed:
                    raise AgentDisconnected(f"{self._name}: agent is not connected")
                self._calls[rid] = call
        try:
            self._send(p.encode_frame(op, rid, payload))
            if not call.done.wait(max(0.0, deadline - time.monotonic())):
                raise AgentTimeout(op.name.lower(), timeout)
        finally:
            with self._lock:
                self._calls.pop(rid, None)
            with self._gate:
                self._gate.notify_all()
        if call.error is not None:
            raise call.error
        frame = call.reply
        if frame is None:
            if self._broken is not None:
                raise AgentProtocolError(f"{self._name}: {self._broken}")
            raise AgentDisconnected(f"{self._name}: agent connection closed during {op.name}")
        fields_out = Fields.decode(frame.payload, max_fields=reply_limit.fields)
        if frame.is_error:
            raise _guest_error(op, fields_out)
        return fields_out

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise AgentDisconnected(f"{self._name}: agent is not connected")
        try:
            with self._send_lock:
                sock.sendall(data)
        except OSError as exc:
            self.close()
            raise AgentDisconnected(f"{self._name}: sending to the agent failed: {exc}") from exc

    # ------------------------------------------------------------------
    # operations
    @property
    def procs(self) -> Processes:
        """Spawned processes: live output, stdin, list, terminals (:mod:`forkyard.guest.procs`)."""
        return Processes(self)


def _guest_error(op: Op, f: Fields) -> GuestError:
    kind = f.str(Tag.KIND, "io")
    msg = f.str(Tag.MESSAGE, "unknown error")
    err = f.int(Tag.ERRNO)
    cls = GuestFileNotFound if kind == "not_found" else GuestError
    return cls(op.name.lower(), msg, kind=kind, errno=err)
