"""The ``forkyard`` typer app, and the one place where its errors become exit codes.

``forkyard.cli.main`` runs the hot commands without it (see ``_fast``) and
hands everything else to this app.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from forkyard import __version__
from forkyard.cli import (
    _admin,
    _checkpoints,
    _cluster_cmds,
    _demo,
    _events,
    _network,
    _processes,
    _sandboxes,
)
from forkyard.cli._output import report_error
from forkyard.errors import ForkyardError

__all__ = ["app"]


class _Group(TyperGroup):
    """Turns any forkyard error raised below into one red line and exit status 1.

    Local ``OSError``s (a missing file for ``files put``, an unwritable
    destination) are the user's to fix as well, so they get the same treatment.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (ForkyardError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                raise  # `forkyard ls | head`: click exits quietly on EPIPE
            report_error(exc, debug=_debug(ctx))
            raise typer.Exit(1) from None


def _debug(ctx: Any) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug")) or os.environ.get("FORKYARD_DEBUG") == "1"


app = typer.Typer(
    cls=_Group,
    name="forkyard",
    help="Real QEMU sandboxes you can checkpoint, fork, hibernate and wake on any worker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"forkyard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


_cluster_cmds.register(app)
_sandboxes.register(app)
_network.register(app)
_events.register(app)
_processes.register(app)
_checkpoints.register(app)
_admin.register(app)
_demo.register(app)
