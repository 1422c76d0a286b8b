"""``forkyard events``: the lifecycle event log, optionally followed."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, connect
from forkyard.cli._output import console, short, when
from forkyard.sdk import _ops
from forkyard.sdk.models import EventInfo

__all__ = ["register"]

_FOLLOW_WAIT = 10.0  # seconds each long poll is held open by the server
_PAGE = 1000


def _line(e: EventInfo) -> str:
    parts = [when(e.time), e.kind, e.sandbox or "-"]
    if e.checkpoint:
        parts.append(f"cp {short(e.checkpoint, 12)}")
    if e.worker:
        parts.append(f"on {e.worker}")
    if e.detail:
        parts.append(f"({e.detail})")
    return " ".join(parts)


def events(
    sandbox: Annotated[str | None, typer.Option("--sandbox", "-s", help="Only this sandbox.")]
    = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")]
    = False,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Lifecycle events (created, checkpointed, forked, hibernated, ...), oldest first.

    With --json, one JSON object a line (so --follow can stream them).
    """
    http = connect(home, url, token)
    after, wait = 0, 0.0
    while True:
        # the first page answers at once; a follower's later polls wait for news
        batch = http.call(_ops.events(sandbox, after, wait, limit=_PAGE))
        for e in batch:
            if json_:
                _json_line(e)
            else:
                console().print(_line(e), markup=False, highlight=False)
            after = max(after, e.id)
        if len(batch) < _PAGE and not follow:
            return
        wait = _FOLLOW_WAIT


def _json_line(e: EventInfo) -> None:
    sys.stdout.write(json.dumps(e.to_json(), sort_keys=True) + "\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Sandboxes")(events)
