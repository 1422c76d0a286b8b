"""Live commands in the CLI: ``exec`` streaming, ``exec -t``/``shell`` terminals, ``attach``.

Output is written as it is read (one bounded read at a time, see
:mod:`forkyard.sdk._proc_ops`), so the next read waits on our stdout: a slow
pipe behind ``forkyard exec`` slows the command instead of filling memory.
Stdin (``--stdin``, or a terminal) is forwarded from a thread in chunks.
Imports stay light: this runs on the fast path of ``exec``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forkyard.sdk._commands import CommandHandle
    from forkyard.sdk._http import SyncHTTP

__all__ = ["exit_status", "follow", "run_live", "run_tty"]

_CHUNK = 64 * 1024


def exit_status(code: int | None, signal: int | None) -> int:
    """A shell's ``$?``: the code, or 128+N for a signal N."""
    if signal:
        return 128 + signal
    return ((code or 0) & 0xFF or 1) if code else 0


def _forward_stdin(handle: CommandHandle, fd: int, *, eof: bool) -> threading.Thread:
    def pump() -> None:
        try:
            while True:
                data = os.read(fd, _CHUNK)
                if not data:
                    break
                handle.send_stdin(data)
            if eof:
                handle.close_stdin()
        except Exception:
            return

    t = threading.Thread(target=pump, name="forkyard-stdin", daemon=True)
    t.start()
    return t


def follow(handle: CommandHandle) -> tuple[int | None, int | None, bool]:
    """Write a process's output to ours until it ends: (exit code, signal, timed out)."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for stream, data in handle:
        f = out if stream == "stdout" else err
        f.write(data)
        f.flush()
    last = handle.last
    assert last is not None
    return last.exit_code, last.signal, last.timed_out


def run_live(http: SyncHTTP, sandbox_id: str, command: str | list[str], *,
             env: Mapping[str, str], cwd: str | None, timeout: float | None, stdin: bool,
             background: bool, user: str | None) -> int:
    """``forkyard exec`` without ``--json``: live output, exit status of the command."""
    from forkyard.sdk._commands import Commands

    cmds = Commands(http, sandbox_id)
    h = cmds.start(command, env=env, cwd=cwd, timeout=timeout, keep_stdin=stdin and not
                   background, user=user, lossless=not background)
    if background:
        sys.stdout.write(f"{h.pid}\n")
        sys.stdout.flush()
        return 0
    if stdin:
        _forward_stdin(h, sys.stdin.fileno(), eof=True)
    try:
        code, sig, timed_out = follow(h)
    except KeyboardInterrupt:
        h.kill(2)  # Ctrl-C reaches the command, as in a local shell
        raise
    if timed_out:
        from forkyard.cli._output import err_console

        err_console().print(f"[red]error:[/red] timed out after {timeout:g}s", markup=True)
        return 124
    return exit_status(code, sig)


def run_tty(http: SyncHTTP, sandbox_id: str, command: str | list[str] | None, *,
            env: Mapping[str, str], cwd: str | None, user: str | None) -> int:
    """A terminal session: raw mode, window size forwarded, the shell's exit status."""
    import signal as sig_mod

    from forkyard.sdk._commands import Pty

    in_fd = sys.stdin.fileno()
    is_tty = os.isatty(in_fd)
    rows, cols = _size()
    h = Pty(http, sandbox_id).create(rows=rows, cols=cols, cmd=command, env=env, cwd=cwd,
                                     user=user)
    saved = None
    if is_tty:
        import termios
        import tty

        saved = termios.tcgetattr(in_fd)
        tty.setraw(in_fd)
    old_winch = None
    if is_tty and hasattr(sig_mod, "SIGWINCH"):
        def winch(_s: int, _f: object) -> None:
            r, c = _size()
            threading.Thread(target=h.resize, args=(r, c), daemon=True).start()

        old_winch = sig_mod.signal(sig_mod.SIGWINCH, winch)
    try:
        _forward_stdin(h, in_fd, eof=False)
        out = sys.stdout.buffer
        for _stream, data in h:
            out.write(data)
            out.flush()
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        if old_winch is not None:
            sig_mod.signal(sig_mod.SIGWINCH, old_winch)
    last = h.last
    assert last is not None
    return exit_status(last.exit_code, last.signal)


def _size() -> tuple[int, int]:
    try:
        sz = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 24, 80
    return max(1, min(sz.lines, 1000)), max(1, min(sz.columns, 1000))
