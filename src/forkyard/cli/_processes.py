"""``ps``, ``kill``, ``attach`` and ``shell``: processes and terminals of a sandbox."""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal as signal_mod
from typing import Annotated

import typer

from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, connect
from forkyard.cli._term import exit_status, follow, run_tty
from forkyard.sdk._commands import Commands

__all__ = ["register"]

IdArg = Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)]
PidArg = Annotated[int, typer.Argument(help="Process id in the guest.", min=2,
                                       show_default=False)]


def _signal_number(name: str) -> int:
    if name.isdigit():
        n = int(name)
    else:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        try:
            n = int(signal_mod.Signals[key])
        except KeyError:
            raise typer.BadParameter(f"unknown signal {name!r}", param_hint="-s") from None
    if not 1 <= n <= 64:
        raise typer.BadParameter(f"signal {n} is not within 1..64", param_hint="-s")
    return n


def ps(sandbox_id: IdArg, home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
       json_: JsonOpt = False) -> None:
    """List the processes the guest agent keeps (started with `exec`, `-d`, `shell`)."""
    procs = Commands(connect(home, url, token), sandbox_id).list()
    if json_:
        from forkyard.cli._output import print_json

        print_json([dataclasses.asdict(p) for p in procs])
        return
    from forkyard.cli._output import console, table

    t = table("pid", "state", "started", "command")
    for p in sorted(procs, key=lambda p: p.started_ns):
        state = "running" if p.running else f"exited {p.exit_code}"
        started = dt.datetime.fromtimestamp(p.started_ns / 1e9, dt.UTC).strftime("%H:%M:%S")
        t.add_row(str(p.pid), state + (" (tty)" if p.pty else ""), started, p.command)
    console().print(t)


def kill(sandbox_id: IdArg, pid: PidArg,
         sig: Annotated[str, typer.Option("--signal", "-s", help="Name or number.")] = "TERM",
         home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Send a signal to a process (and its process group) in the guest."""
    Commands(connect(home, url, token), sandbox_id).kill(pid, _signal_number(sig))


def attach(sandbox_id: IdArg, pid: PidArg,
           from_start: Annotated[bool, typer.Option(
               "--from-start", help="Replay the scrollback the agent kept.")] = False,
           home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Follow a running process's output until it ends; exit with its status."""
    h = Commands(connect(home, url, token), sandbox_id).connect(pid, from_start=from_start)
    code, sig, _ = follow(h)
    status = exit_status(code, sig)
    if status:
        raise typer.Exit(status)


def shell(sandbox_id: IdArg,
          user: Annotated[str | None, typer.Option("--user", "-u", help="Guest account.")]
          = None,
          cwd: Annotated[str | None, typer.Option("--cwd")] = None,
          home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """An interactive login shell in the sandbox (raw terminal, resizes forwarded)."""
    status = run_tty(connect(home, url, token), sandbox_id, None, env={}, cwd=cwd, user=user)
    if status:
        raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    panel = "Processes"
    app.command(rich_help_panel=panel)(ps)
    app.command(rich_help_panel=panel)(kill)
    app.command(rich_help_panel=panel)(attach)
    app.command(rich_help_panel=panel)(shell)
