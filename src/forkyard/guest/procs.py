"""Host side of spawned processes: start, read output by offset, stdin, list, resize.

See the "Processes" part of :mod:`forkyard.guest.protocol`.  Every reply is
bounded (``READ_MAX`` bytes per stream and read, ``LIST_MAX`` entries), so a
caller that streams a command's output holds one read at a time whatever the
guest prints; the caller decides the pace by when it asks for more.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from forkyard.errors import AgentProtocolError
from forkyard.guest import protocol as p
from forkyard.guest.protocol import Fields, Limit, Op, Tag


class _Caller(Protocol):
    """What the process operations need of an ``AgentClient``: one bounded call.

    A protocol rather than the client class, so this module and the client
    (which offers these operations as ``.procs``) do not import each other.
    """

    def _call(self, op: Op, fields: Sequence[tuple[Tag, p.FieldValue]], *, timeout: float,
              request_id: int | None = ..., reply_limit: Limit = ...) -> Fields: ...

__all__ = ["LIST_MAX", "MAX_WAIT", "READ_MAX", "STDIN_MAX", "Chunk", "ProcInfo", "Processes"]

READ_MAX = 1024 * 1024  # bytes per stream in one read (the agent's PROC_READ_MAX)
STDIN_MAX = 1024 * 1024  # bytes the agent buffers for one process's stdin
LIST_MAX = 64  # processes the agent keeps (MAX_PROCS)
MAX_WAIT = 60.0  # seconds one read may wait in the guest
CMD_MAX = 256
_PROC = struct.Struct("<IIiIQ")
_SLACK = 4096
_GRACE = 10.0


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one read returned: bytes at ``out_offset``/``err_offset`` and, at the end, the exit."""

    pid: int
    stdout: bytes
    stderr: bytes
    out_offset: int  # where ``stdout`` starts (> the asked offset: that much was dropped)
    err_offset: int
    exited: bool = False
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    @property
    def out_next(self) -> int:
        return self.out_offset + len(self.stdout)

    @property
    def err_next(self) -> int:
        return self.err_offset + len(self.stderr)


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    command: str
    running: bool
    pty: bool
    exit_code: int | None
    started_ns: int
    timed_out: bool = False


class Processes:
    """The process operations of one :class:`~forkyard.guest.client.AgentClient`."""

    def __init__(self, agent: _Caller) -> None:
        self._agent = agent

    def spawn(
        self,
        cmd: str | Sequence[str] | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        keep_stdin: bool = False,
        lossless: bool = False,
        user: str | None = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> int:
        """Start ``cmd`` (None on a PTY: the user's login shell); its pid."""
        fields: list[tuple[Tag, p.FieldValue]] = []
        if isinstance(cmd, str):
            fields.append((Tag.SHELL, cmd))
        elif cmd is not None:
            if not cmd:
                raise ValueError("empty argv")
            fields.extend((Tag.ARGV, a) for a in cmd)
        elif not pty:
            raise ValueError("a command is needed unless on a terminal")
        for k, v in (env or {}).items():
            if "=" in k or not k:
                raise ValueError(f"bad environment variable name {k!r}")
            fields.append((Tag.ENV, f"{k}={v}"))
        if cwd:
            fields.append((Tag.CWD, cwd))
        if timeout:
            fields.append((Tag.TIMEOUT_MS, max(1, int(timeout * 1000))))
        if stdin:
            if len(stdin) > STDIN_MAX:
                raise ValueError(f"initial stdin over {STDIN_MAX} bytes: send it with write()")
            fields.append((Tag.STDIN, stdin))
        if user:
            fields.append((Tag.USER, user))
        if pty:
            if not (1 <= rows <= 1000 and 1 <= cols <= 1000):
                raise ValueError("terminal size must be within 1..1000")
            fields += [(Tag.ROWS, rows), (Tag.COLS, cols)]
        flags = ((p.SPAWN_LOSSLESS if lossless else 0) | (p.SPAWN_PTY if pty else 0)
                 | (p.SPAWN_KEEP_STDIN if keep_stdin else 0))
        fields.append((Tag.FLAGS, flags))
        r = self._agent._call(Op.SPAWN, fields, timeout=30.0)
        return r.int(Tag.PID)

    def read(self, pid: int, out_offset: int = 0, err_offset: int = 0, *,
             max_bytes: int = READ_MAX, wait: float = 0.0) -> Chunk:
        """Output at the offsets (at most ``max_bytes`` a stream), waiting up to ``wait`` s."""
        max_bytes = max(1, min(max_bytes, READ_MAX))
        wait = max(0.0, min(wait, MAX_WAIT))
        fields: list[tuple[Tag, p.FieldValue]] = [
            (Tag.PID, pid), (Tag.OFFSET, max(0, out_offset)), (Tag.ERR_OFFSET, max(0, err_offset)),
            (Tag.LENGTH, max_bytes), (Tag.WAIT_MS, int(wait * 1000))]
        r = self._agent._call(Op.PROC_READ, fields, timeout=wait + _GRACE,
                              reply_limit=Limit(2 * max_bytes + _SLACK, 16))
        out, err = r.bytes(Tag.STDOUT), r.bytes(Tag.STDERR)
        o, e = r.int(Tag.OFFSET), r.int(Tag.ERR_OFFSET)
        # a guest that ignores LENGTH, or sends bytes from before the asked offset (an
        # offset past the end is clamped to the end, with nothing to send)
        if (len(out) > max_bytes or len(err) > max_bytes or (o < out_offset and out)
                or (e < err_offset and err)):
            raise AgentProtocolError("proc_read reply out of the asked bounds")
        exited = bool(r.int(Tag.EXITED))
        sig = r.raw(Tag.SIGNAL)
        return Chunk(pid, out, err, o, e, exited,
                     r.int(Tag.EXIT_CODE, signed=True) if exited else None,
                     r.int(Tag.SIGNAL) if sig is not None else None,
                     bool(r.int(Tag.TIMED_OUT)))

    def write(self, pid: int, data: bytes, *, eof: bool = False) -> int:
        """Queue ``data`` for the process's stdin; the bytes still pending there.

        A full buffer raises :class:`~forkyard.errors.GuestError` with
        ``kind == "busy"``: the caller waits and sends again (backpressure).
        """
        if len(data) > STDIN_MAX:
            raise ValueError(f"at most {STDIN_MAX} bytes per write")
        fields: list[tuple[Tag, p.FieldValue]] = [(Tag.PID, pid),
                                                   (Tag.FLAGS, p.INPUT_EOF if eof else 0)]
        if data:
            fields.append((Tag.DATA, data))
        return self._agent._call(Op.PROC_INPUT, fields, timeout=30.0).int(Tag.SIZE)

    def list(self) -> list[ProcInfo]:
        limit = Limit(LIST_MAX * (6 + _PROC.size + CMD_MAX) + _SLACK, LIST_MAX + 4)
        r = self._agent._call(Op.PROC_LIST, [], timeout=30.0, reply_limit=limit)
        out: list[ProcInfo] = []
        for raw in r.views(Tag.PROC):
            if len(raw) < _PROC.size or len(raw) > _PROC.size + CMD_MAX:
                raise AgentProtocolError("proc_list reply: bad process entry")
            pid, flags, code, _, start = _PROC.unpack_from(raw)
            exited = bool(flags & p.PROC_EXITED)
            out.append(ProcInfo(pid, bytes(raw[_PROC.size:]).decode("utf-8", "replace"),
                                not exited, bool(flags & p.PROC_PTY),
                                code if exited else None, start,
                                bool(flags & p.PROC_TIMED_OUT)))
        return out

    def resize(self, pid: int, rows: int, cols: int) -> None:
        if not (1 <= rows <= 1000 and 1 <= cols <= 1000):
            raise ValueError("terminal size must be within 1..1000")
        self._agent._call(Op.PTY_RESIZE, [(Tag.PID, pid), (Tag.ROWS, rows), (Tag.COLS, cols)],
                          timeout=10.0)
