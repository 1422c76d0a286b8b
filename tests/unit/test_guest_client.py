"""AgentClient against a scripted hostile agent: bounded replies, typed errors, usable channel."""

from __future__ import annotations

import socket
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forkyard.errors import AgentDisconnected, AgentProtocolError, PayloadTooLarge
from forkyard.guest import protocol as p
from forkyard.guest.client import MAX_FILE_SIZE, AgentClient
from forkyard.guest.protocol import Fields, Flag, Frame, FrameDecoder, Limit, Op, Tag

MiB = 1024 * 1024
RESP = int(Flag.RESPONSE)

class Hostile:
    """A reply to send as is, under the request's id: (op, payload) built ahead of time."""

    def __init__(self, op: Op, fields: list[tuple[Tag, p.FieldValue]] | bytes) -> None:
        self.op = op
        self.payload = fields if isinstance(fields, bytes) else p.encode_fields(fields)


# op, request fields -> what to send back (after the ACK); None: the usual answer
Script = Callable[[int, Fields], "Hostile | bytes | None"]


def reply(op: int, rid: int, fields: list[tuple[Tag, p.FieldValue]] | bytes,
          flags: int = RESP) -> bytes:
    payload = fields if isinstance(fields, bytes) else p.encode_fields(fields)
    return p.encode_frame(Op(op), rid, payload, flags)


class FakeAgent:
    """A guest agent on a unix socket that answers HELLO and lets a test script the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.script: Script = lambda op, f: None
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            dec = FrameDecoder(Limit(p.MAX_PAYLOAD, 1 << 20))
            with conn:
                while data := conn.recv(1 << 16):
                    for fr in dec.feed(data):
                        assert isinstance(fr, Frame)
                        conn.sendall(reply(Op.ACK, fr.id, b""))
                        self._answer(conn, fr)

    def _answer(self, conn: socket.socket, fr: Frame) -> None:
        f = Fields.decode(fr.payload, max_fields=1 << 20)
        out = self.script(fr.op, f)
        if isinstance(out, Hostile):
            # header and payload apart: the test's memory figures must not count a copy here
            conn.sendall(p.HEADER.pack(p.MAGIC, out.op, RESP, fr.id, len(out.payload)))
            conn.sendall(out.payload)
        elif out is not None:
            conn.sendall(out)
        else:
            conn.sendall(self._usual(fr, f))

    def _usual(self, fr: Frame, f: Fields) -> bytes:
        if fr.op == Op.HELLO:
            return reply(fr.op, fr.id, [(Tag.VERSION, "fake"), (Tag.NONCE, f.bytes(Tag.NONCE))])
        return reply(fr.op, fr.id, [(Tag.EXIT_CODE, 0), (Tag.STDOUT, b"ok")])

    def close(self) -> None:
        self._srv.close()


hostile = Hostile


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[FakeAgent, AgentClient]]:
    fake = FakeAgent(tmp_path / "agent.sock")
    client = AgentClient(tmp_path / "agent.sock", name="fake")
    client.connect(timeout=10)
    yield fake, client
    client.close()
    fake.close()


def traced_peak(fn: Callable[[], object]) -> tuple[object, int]:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        try:
            out: object = fn()
        except Exception as exc:  # the caller checks what came out
            out = exc
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_exec_output_is_cut_at_max_output_on_the_host(agent):
    fake, client = agent
    # a guest that ignores MAX_OUTPUT: 2 MiB of stdout for a 1 MiB limit, no TRUNCATED flag
    fake.script = lambda op, f: hostile(Op.EXEC, [
        (Tag.EXIT_CODE, 0), (Tag.STDOUT, b"o" * (2 * MiB)), (Tag.STDERR, b"e" * 10)])
    r = client.exec("yes", max_output=1 * MiB)
    assert r.truncated and len(r.stdout_bytes) == 1 * MiB and r.stderr_bytes == b"e" * 10


def test_exec_reply_over_its_limit_is_refused_unbuffered_and_channel_stays_usable(agent):
    fake, client = agent
    flood = hostile(Op.EXEC, [(Tag.STDOUT, b"o" * (40 * MiB))])
    fake.script = lambda op, f: flood if op == Op.EXEC else None
    err, peak = traced_peak(lambda: client.exec("yes", max_output=1 * MiB))
    assert isinstance(err, PayloadTooLarge), err
    assert err.size > 40 * MiB and err.limit < 3 * MiB
    # the 40 MiB were streamed past, never held: far less than the reply was allocated
    assert peak < 4 * MiB, f"{peak} bytes allocated for a refused reply"
    assert client.ping() == "fake"


def test_read_file_holds_its_own_limit(agent):
    fake, client = agent
    data = b"d" * (MAX_FILE_SIZE + 100)  # inside the frame slack, over the file limit
    fake.script = lambda op, f: hostile(Op.READ_FILE, [(Tag.SIZE, 10), (Tag.DATA, data)]) \
        if op == Op.READ_FILE else None
    with pytest.raises(PayloadTooLarge) as e:
        client.read_file("/x")
    assert e.value.limit == MAX_FILE_SIZE and e.value.size == len(data)
    big = b"d" * (80 * MiB)  # what the old host accepted
    fake.script = lambda op, f: hostile(Op.READ_FILE, [(Tag.DATA, big)]) \
        if op == Op.READ_FILE else None
    with pytest.raises(PayloadTooLarge):
        client.read_file("/x")
    assert client.ping() == "fake"


def test_a_streamed_read_holds_each_chunk_to_what_was_asked(agent):
    """A guest answering a chunk read with more than asked (or a flood) costs one chunk."""
    fake, client = agent
    flood = hostile(Op.READ_FILE, [(Tag.SIZE, 1 << 40), (Tag.DATA, b"d" * (30 * MiB))])
    fake.script = lambda op, f: flood if op == Op.READ_FILE else None
    err, peak = traced_peak(lambda: client.read_at("/x", 0, 4 * MiB))
    assert isinstance(err, PayloadTooLarge), err
    assert peak < 6 * MiB, f"{peak} bytes allocated for a refused chunk"
    # within the slack but longer than asked: refused as well
    fake.script = lambda op, f: hostile(Op.READ_FILE, [(Tag.SIZE, 10),
                                                       (Tag.DATA, b"d" * (MiB + 10))]) \
        if op == Op.READ_FILE else None
    with pytest.raises(AgentProtocolError, match="more than asked"):
        client.read_at("/x", 0, MiB)
    assert client.ping() == "fake"


def _entry(name: bytes) -> bytes:
    return struct.pack("<IQq", 0o100644, 0, 0) + name


def test_listing_is_capped_even_if_the_guest_sends_more(agent):
    fake, client = agent
    seen: dict[str, int] = {}

    def script(op: int, f: Fields) -> bytes | None:
        if op != Op.LIST:
            return None
        seen["max"] = f.int(Tag.MAX_ENTRIES)
        return hostile(Op.LIST, [(Tag.ENTRY, _entry(b"f%05d" % i)) for i in range(110)])

    fake.script = script
    listing = client.list("/d", limit=100)
    assert seen["max"] == 100  # the agent is told the cap
    assert listing.truncated and len(listing) == 100
    assert [e.name for e in listing] == sorted(e.name for e in listing)


def test_listing_reports_the_agents_truncated_flag(agent):
    fake, client = agent
    fake.script = lambda op, f: hostile(Op.LIST, [
        (Tag.ENTRY, _entry(b"b")), (Tag.ENTRY, _entry(b"a")), (Tag.TRUNCATED, 1)])
    listing = client.list("/d", limit=2)
    assert listing.truncated and [e.name for e in listing] == ["a", "b"]
    fake.script = lambda op, f: hostile(Op.LIST, [(Tag.ENTRY, _entry(b"a"))])
    assert not client.list("/d").truncated


def test_a_flood_of_entries_is_refused_in_bounded_memory(agent):
    fake, client = agent
    # 8 MiB of entries (~300k): the reply that used to become ~480 MB on the worker
    flood = hostile(Op.LIST, p.encode_fields([(Tag.ENTRY, _entry(b"x" * 8))] * (8 * MiB // 26)))
    fake.script = lambda op, f: flood if op == Op.LIST else None
    err, peak = traced_peak(lambda: client.list("/d", limit=1000))
    assert isinstance(err, PayloadTooLarge), err
    assert peak < 2 * MiB
    # within the byte limit but over the field count: refused as well
    many = p.encode_fields([(Tag.MODE, b"")] * 5000)
    fake.script = lambda op, f: hostile(Op.LIST, many) if op == Op.LIST else None
    with pytest.raises(PayloadTooLarge) as e:
        client.list("/d", limit=1000)
    assert e.value.unit == "fields"
    assert client.ping() == "fake"


def test_small_replies_are_small(agent):
    fake, client = agent
    fake.script = lambda op, f: hostile(Op.STAT, [(Tag.ENTRY, b"e" * (1 * MiB))]) \
        if op == Op.STAT else None
    with pytest.raises(PayloadTooLarge):
        client.stat("/x")
    assert client.ping() == "fake"


def test_broken_framing_fails_the_call_with_a_protocol_error(agent):
    fake, client = agent
    fake.script = lambda op, f: b"NOPE" + b"\0" * 12 if op == Op.SYNC else None
    with pytest.raises(AgentProtocolError, match="magic"):
        client.sync(timeout=5)
    assert not client.connected
    # the next call starts a fresh session (the stream cannot be resynchronised in place)
    assert client.ping() == "fake"
    assert client.connected
    client.close()
    with pytest.raises(AgentDisconnected):  # closed on purpose stays closed
        client.ping()


def test_process_reads_are_bounded_whatever_the_guest_sends(agent):
    """A guest that floods a PROC_READ reply: refused unbuffered; one that breaks the
    offset contract: a protocol error, not bytes the caller would place wrongly."""
    from forkyard.errors import AgentProtocolError
    from forkyard.guest.procs import READ_MAX

    fake, client = agent
    flood = hostile(Op.PROC_READ, [(Tag.STDOUT, b"o" * (40 * MiB))])
    fake.script = lambda op, f: flood if op == Op.PROC_READ else None
    err, peak = traced_peak(lambda: client.procs.read(42, 0, 0, max_bytes=READ_MAX * 8))
    assert isinstance(err, PayloadTooLarge) and err.limit < 3 * READ_MAX, err
    assert peak < 4 * MiB, f"{peak} bytes allocated for a refused reply"
    # over the asked max (within the frame limit), and bytes from before the asked offset
    for fields in ([(Tag.STDOUT, b"x" * 2000), (Tag.OFFSET, 0), (Tag.ERR_OFFSET, 0)],
                   [(Tag.STDOUT, b"x"), (Tag.OFFSET, 5), (Tag.ERR_OFFSET, 0)]):
        fake.script = lambda op, f, fl=fields: hostile(Op.PROC_READ, fl) \
            if op == Op.PROC_READ else None
        with pytest.raises(AgentProtocolError):
            client.procs.read(42, 10, 0, max_bytes=1000)
    # an offset past the end is clamped by the guest: an empty answer there is fine
    fake.script = lambda op, f: hostile(Op.PROC_READ, [
        (Tag.STDOUT, b""), (Tag.OFFSET, 3), (Tag.ERR_OFFSET, 0)]) if op == Op.PROC_READ else None
    c = client.procs.read(42, 10, 0)
    assert (c.out_offset, c.stdout, c.exited) == (3, b"", False)
    # a process list with a malformed entry
    fake.script = lambda op, f: hostile(Op.PROC_LIST, [(Tag.PROC, b"short")]) \
        if op == Op.PROC_LIST else None
    with pytest.raises(AgentProtocolError):
        client.procs.list()
    assert client.ping() == "fake"
