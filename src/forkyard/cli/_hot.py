"""The bodies of the hot commands (``ls``, ``exec``), free of typer.

Both the typer commands of :mod:`forkyard.cli._sandboxes` and the fast
dispatcher of :mod:`forkyard.cli._fast` run these, so the two ways in cannot
drift apart.  Nothing heavy is imported at module level: the SDK (httpx) is
imported by the command that calls it, rich only once there is a table or an
error to print.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forkyard.sdk._http import SyncHTTP
    from forkyard.sdk.models import SandboxInfo

__all__ = ["EXEC_TIMEOUT", "connect", "parse_env", "parse_labels", "print_sandboxes",
           "run_exec", "run_ls"]

EXEC_TIMEOUT = 60.0  # seconds, `exec --timeout`'s default on both paths


def connect(home: Path | None, url: str | None, token: str | None) -> SyncHTTP:
    from forkyard.sdk._http import SyncHTTP
    from forkyard.sdk.config import ConnectionConfig

    return SyncHTTP(ConnectionConfig.resolve(url=url, token=token, home=home))


def parse_env(items: list[str] | None) -> dict[str, str]:
    """``--env KEY=VALUE`` options as a mapping; ValueError names the first bad one."""
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """``--label KEY=VALUE`` options (the server checks keys and values)."""
    labels: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _sandbox_table(infos: list[SandboxInfo]) -> None:
    from forkyard.cli._output import console, short, table, when

    t = table("id", "state", "worker", "image", "memory", "cpus", "created", "parent")
    for s in infos:
        state = s.state if s.error is None else f"{s.state} ({s.error})"
        t.add_row(s.id, state, s.worker or "-", short(s.image), f"{s.memory_mb or '-'} MiB",
                  str(s.cpus or "-"), when(s.created), short(s.parent_checkpoint))
    console().print(t)


def print_sandboxes(infos: list[SandboxInfo], json_: bool) -> None:
    if json_:
        from forkyard.cli._output import print_json

        print_json([s.to_json() for s in infos])
    else:
        _sandbox_table(infos)


def run_ls(http: SyncHTTP, json_: bool, labels: dict[str, str] | None = None,
           state: str | None = None) -> None:
    from forkyard.sdk import _ops

    print_sandboxes(http.call(_ops.list_sandboxes(labels, state)), json_)


def _write(out: bytes, err: bytes) -> None:
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.flush()


def run_exec(connect: Callable[[], SyncHTTP], sandbox_id: str, cmd: list[str], *,
             env: Mapping[str, str], cwd: str | None, timeout: float, stdin: bool,
             background: bool, json_: bool) -> int:
    """Run one command; returns this process's exit status (the guest's, 128+N
    for a signal N, 124 for a timeout)."""
    from forkyard.sdk import _ops
    from forkyard.sdk.errors import SandboxTimeout

    command: str | list[str] = cmd[0] if len(cmd) == 1 else cmd
    data = sys.stdin.buffer.read() if stdin else None
    http = connect()
    call = _ops.exec_(sandbox_id, command, env=dict(env), cwd=cwd, timeout=timeout or None,
                      stdin=data, background=background)
    try:
        result = http.call(call)
    except SandboxTimeout as exc:
        if exc.status != 504:
            raise
        from forkyard.cli._output import err_console

        _write(exc.stdout_bytes, exc.stderr_bytes)
        err_console().print(f"[red]error:[/red] timed out after {timeout:g}s", markup=True)
        return 124
    if json_:
        from forkyard.cli._output import print_json

        print_json(result.to_json())
    elif background:
        from forkyard.cli._output import console

        console().print(str(result.pid))
    else:
        _write(result.stdout_bytes, result.stderr_bytes)
    code = 128 + result.signal if result.signal else result.exit_code
    return (code & 0xFF or 1) if code else 0
