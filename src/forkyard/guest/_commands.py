"""The agent's command calls (exec, sync, kill, identity, network, growing the disk),
as a part of :class:`~forkyard.guest.client.AgentClient`.

Exec output is cut at ``max_output`` here as well as in the guest: the guest
may not honour it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from forkyard.errors import CommandFailed, CommandTimeout
from forkyard.guest import protocol as p
from forkyard.guest._fileops import REPLY_SLACK
from forkyard.guest.protocol import SMALL_REPLY, Fields, Limit, Op, Tag

__all__ = ["DEFAULT_MAX_OUTPUT", "MAX_OUTPUT", "CommandOps", "ExecResult"]

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024  # per stream (stdout, stderr)
MAX_OUTPUT = 64 * 1024 * 1024  # the largest max_output a caller may ask for
_GRACE = 10.0  # on top of a command's own timeout: reply transfer under TCG


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    pid: int = 0
    signal: int | None = None
    timed_out: bool = False
    truncated: bool = False

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class CommandOps(ABC):
    """Command calls over the client's ``_call`` (bounded replies, timeouts, errors)."""

    @abstractmethod
    def _call(self, op: Op, fields: Sequence[tuple[Tag, p.FieldValue]], *, timeout: float,
              request_id: int | None = None, reply_limit: Limit = SMALL_REPLY) -> Fields:
        ...

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60.0,
        stdin: bytes | None = None,
        background: bool = False,
        check: bool = False,
        max_output: int = DEFAULT_MAX_OUTPUT,
        user: str | None = None,
    ) -> ExecResult:
        """Run a command: a string goes through ``/bin/sh -c``, a list is argv.

        stdout and stderr keep at most ``max_output`` bytes each; the rest is
        dropped and ``truncated`` set (by the guest, and here for a guest that
        sends more anyway).
        """
        if not 0 <= max_output <= MAX_OUTPUT:
            raise ValueError(f"max_output must be within 0..{MAX_OUTPUT}")
        fields: list[tuple[Tag, p.FieldValue]] = []
        if isinstance(cmd, str):
            fields.append((Tag.SHELL, cmd))
        else:
            if not cmd:
                raise ValueError("empty argv")
            fields.extend((Tag.ARGV, a) for a in cmd)
        for k, v in (env or {}).items():
            if "=" in k or not k:
                raise ValueError(f"bad environment variable name {k!r}")
            fields.append((Tag.ENV, f"{k}={v}"))
        if cwd:
            fields.append((Tag.CWD, cwd))
        if timeout:
            fields.append((Tag.TIMEOUT_MS, max(1, int(timeout * 1000))))
        if stdin is not None:
            fields.append((Tag.STDIN, stdin))
        if background:
            fields.append((Tag.FLAGS, p.EXEC_BACKGROUND))
        if user:
            fields.append((Tag.USER, user))
        fields.append((Tag.MAX_OUTPUT, max_output))
        call_timeout = (timeout or 24 * 3600.0) + _GRACE
        limit = Limit(2 * max_output + REPLY_SLACK, 32)
        r = self._call(Op.EXEC, fields, timeout=call_timeout, reply_limit=limit)
        sig = r.raw(Tag.SIGNAL)
        out, err = r.view(Tag.STDOUT), r.view(Tag.STDERR)
        cut = any(v is not None and len(v) > max_output for v in (out, err))
        result = ExecResult(
            exit_code=r.int(Tag.EXIT_CODE, signed=True),
            stdout_bytes=b"" if out is None else bytes(out[:max_output]),
            stderr_bytes=b"" if err is None else bytes(err[:max_output]),
            pid=r.int(Tag.PID),
            signal=None if sig is None else r.int(Tag.SIGNAL),
            timed_out=bool(r.int(Tag.TIMED_OUT)),
            truncated=cut or bool(r.int(Tag.TRUNCATED)),
        )
        if result.timed_out:
            raise CommandTimeout(_describe(cmd), timeout or 0.0, result)
        if check and result.exit_code != 0:
            raise CommandFailed(_describe(cmd), result)
        return result

    def sync(self, *, drop_page_cache: bool = False, timeout: float = 60.0) -> None:
        """Flush the guest's dirty data to disk; then, optionally, drop its clean page cache."""
        flags = p.SYNC_DROP_CACHES if drop_page_cache else 0
        self._call(Op.SYNC, [(Tag.FLAGS, flags)], timeout=timeout)

    def kill(self, pid: int, signal: int = 9) -> None:
        self._call(Op.KILL, [(Tag.PID, pid), (Tag.SIGNAL, signal)], timeout=10.0)

    def set_identity(self, *, hostname: str, machine_id: str,
                     timeout: float = 30.0) -> bool:
        """Give the guest its own hostname and (where the image has one) machine-id.

        Returns whether ``/etc/machine-id`` was rewritten.
        """
        r = self._call(Op.IDENTITY, [(Tag.HOSTNAME, hostname), (Tag.MACHINE_ID, machine_id)],
                       timeout=timeout)
        return bool(r.int(Tag.FLAGS) & p.IDENTITY_MACHINE_ID)

    def configure_net(self, *, address: str, prefix: int, gateway: str, dns: str,
                      reset_tcp: bool, timeout: float = 30.0) -> int:
        """Set eth0 up (``Op.NET``); the number of stale TCP connections it aborted."""
        r = self._call(Op.NET, [(Tag.NET_ADDRESS, address), (Tag.NET_PREFIX, prefix),
                                (Tag.NET_GATEWAY, gateway), (Tag.NET_DNS, dns),
                                (Tag.FLAGS, p.NET_RESET_TCP if reset_tcp else 0)],
                       timeout=timeout)
        return r.int(Tag.NET_RESET)

    def grow_fs(self, *, timeout: float = 120.0) -> int:
        """Grow the guest's root filesystem to its disk; returns its new size in bytes."""
        return self._call(Op.GROW_FS, [], timeout=timeout).int(Tag.SIZE)

    def ping(self, *, timeout: float = 10.0) -> str:
        r = self._call(Op.HELLO, [], timeout=timeout)
        return r.str(Tag.VERSION)


def _describe(cmd: str | Sequence[str]) -> str:
    return cmd if isinstance(cmd, str) else " ".join(cmd)
