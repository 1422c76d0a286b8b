"""``forkyard keys create/ls/revoke``: API keys (tenants), through ``/v1/keys`` (admin only).

And ``forkyard keys worker NAME``: the credential for a worker daemon on another
machine (``forkyard worker --worker-token``), bound to that name.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, connect
from forkyard.cli._output import console, print_json, table, when
from forkyard.sdk._http import Call, json_body, no_body

__all__ = ["keys_app", "register"]

keys_app = typer.Typer(help="API keys: each is a tenant that sees only its own sandboxes "
                            "and checkpoints (admin keys see all).", no_args_is_help=True)


def _object(response: Any) -> dict[str, Any]:
    data = json_body(response)
    return data if isinstance(data, dict) else {}


@keys_app.command("create")
def create(name: Annotated[str, typer.Argument(help="Key name = tenant name.")],
           admin: Annotated[bool, typer.Option("--admin", help="Sees and manages everything, "
                                               "keys included.")] = False,
           home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
           json_: JsonOpt = False) -> None:
    """Create a key; it is printed this once (only its hash is kept)."""
    made = connect(home, url, token).call(
        Call("POST", "/v1/keys", _object, json={"name": name, "admin": admin}))
    if json_:
        print_json(made)
        return
    console().print(f"key {made['name']}{' (admin)' if made['admin'] else ''}: {made['key']}")
    console().print("it is shown only now: store it (FORKYARD_API_TOKEN=... or --token)")


@keys_app.command("ls")
def ls(home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
       json_: JsonOpt = False) -> None:
    """List the keys (names, never the secrets)."""
    rows = connect(home, url, token).call(Call("GET", "/v1/keys", json_body))
    if json_:
        print_json(rows)
        return
    t = table("name", "admin", "created", "revoked")
    for k in rows:
        t.add_row(k["name"], "yes" if k["admin"] else "-", when(k["created"]),
                  when(k["revoked"]) if k.get("revoked") else "-")
    console().print(t)


@keys_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")],
           home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Revoke a key at once (its objects stay; the name is never reused)."""
    connect(home, url, token).call(Call("DELETE", f"/v1/keys/{name}", no_body))
    console().print(f"revoked {name}")


@keys_app.command("worker")
def worker_credential(name: Annotated[str, typer.Argument(help="The worker's name.")],
                      home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
                      json_: JsonOpt = False) -> None:
    """Enrol a worker: print the credential `forkyard worker --name NAME` runs with."""
    made = connect(home, url, token).call(
        Call("POST", f"/v1/workers/{name}/credential", _object))
    if json_:
        print_json(made)
        return
    console().print(made["credential"])


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys", rich_help_panel="Cluster")
