"""``forkyard network``, ``url`` and ``port-forward``: a sandbox's network from the shell."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, connect
from forkyard.cli._output import console, print_json
from forkyard.sdk import _ops
from forkyard.sdk.models import SandboxInfo

__all__ = ["AllowOpt", "DenyOpt", "NetworkOpt", "register"]

NetworkOpt = Annotated[str | None, typer.Option(
    "--network", help="outbound (default) or none (no network card).")]
AllowOpt = Annotated[list[str] | None, typer.Option(
    "--allow-out", help="Allow egress to a CIDR or domain (repeatable; deny wins).")]
DenyOpt = Annotated[list[str] | None, typer.Option(
    "--deny-out", help="Deny egress to a CIDR or domain (repeatable).")]


def print_network(info: SandboxInfo) -> None:
    net = info.network
    out = console()
    if net is None:
        out.print("mode: none")
        return
    out.print(f"mode: {net.mode}")
    out.print("allow_out: " + (" ".join(net.allow_out) or "-"))
    out.print("deny_out: " + (" ".join(net.deny_out) or "-"))


def network(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)],
    allow_out: AllowOpt = None, deny_out: DenyOpt = None,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """Show a sandbox's network; with --allow-out/--deny-out, replace those rules."""
    http = connect(home, url, token)
    if allow_out is None and deny_out is None:
        info = http.call(_ops.get_sandbox(sandbox_id))
    else:
        info = http.call(_ops.set_network(sandbox_id, allow_out, deny_out))
    if json_:
        print_json(info.network.to_json() if info.network else {"mode": "none"})
    else:
        print_network(info)


def url_(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)],
    port: Annotated[int, typer.Argument(min=1, max=65535, help="Guest TCP port.")],
    public: Annotated[bool, typer.Option(
        "--public", help="No token needed (if the operator enabled public ports).")] = False,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Print a URL of a guest port through the control plane (with a new preview token)."""
    from forkyard.sdk._network import preview_url

    http = connect(home, url, token)
    data = http.call(_ops.preview(sandbox_id, port, public))
    console().print(preview_url(http.config.url, data), soft_wrap=True)


def port_forward(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)],
    ports: Annotated[str, typer.Argument(help="[LOCAL:]REMOTE, e.g. 8080:80 or 80.")],
    max_connections: Annotated[int, typer.Option("--max-connections", min=1, max=1024)] = 64,
    home: HomeOpt = None, url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Forward a local TCP port to a guest port (until interrupted)."""
    from forkyard.sdk._forward import Forwarder

    local, _, remote = ports.rpartition(":")
    if not remote.isdigit() or (local and not local.isdigit()) \
            or not 1 <= int(remote) <= 65535 or (local and int(local) > 65535):
        raise typer.BadParameter(f"{ports!r} is not [LOCAL:]REMOTE", param_hint="PORTS")
    http = connect(home, url, token)
    http.call(_ops.get_sandbox(sandbox_id))  # a typo'd id fails here, not per connection
    fwd = Forwarder(http.config, sandbox_id, int(remote), local_port=int(local or 0),
                    max_connections=max_connections,
                    on_error=lambda exc: print(f"tunnel: {exc}", file=sys.stderr))
    console().print(f"forwarding 127.0.0.1:{fwd.port} -> {sandbox_id}:{remote}")
    try:
        fwd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fwd.close()


def register(app: typer.Typer) -> None:
    panel = "Network"
    app.command(rich_help_panel=panel)(network)
    app.command("url", rich_help_panel=panel)(url_)
    app.command("port-forward", rich_help_panel=panel)(port_forward)
