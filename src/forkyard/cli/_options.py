"""Options every command shares, and how a command finds its control plane."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from forkyard.cli._hot import connect
from forkyard.sdk.config import ENV_TOKEN, ENV_URL, resolve_home

__all__ = ["HomeOpt", "JsonOpt", "TokenOpt", "UrlOpt", "connect", "home_dir", "interactive"]

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="FORKYARD_HOME",
        help="forkyard home: the cluster's for cluster commands (default: $FORKYARD_HOME, "
        "then ~/.forkyard).",
        show_default=False,
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar=ENV_URL, help="Control plane URL (default: the cluster "
                 "recorded in --home).", show_default=False),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar=ENV_TOKEN, help="API token (default: from --home's "
                 "cluster.json).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def home_dir(home: Path | None) -> Path:
    return resolve_home(home)


def interactive() -> bool:
    """Show progress bars only to a person at a terminal."""
    return sys.stderr.isatty()
