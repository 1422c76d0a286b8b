"""The control plane's network routes: egress rules of a running sandbox, preview URLs.

The proxied traffic itself does not pass through FastAPI's routing: it is
served by :class:`._proxy.PortProxy` (streaming both ways, own auth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request

from forkyard.control._deps import Caller
from forkyard.control._service import ControlPlane
from forkyard.wire.models import SandboxOut
from forkyard.wire.ports import MAX_PORT, NetworkUpdate, PreviewOut, PreviewRequest

__all__ = ["add_port_routes"]

SandboxId = Annotated[str, Path(description="sandbox id (`sb-` + 20 hex digits)")]
Port = Annotated[int, Path(ge=1, le=MAX_PORT, description="a TCP port of the guest")]


def add_port_routes(app: FastAPI, plane: ControlPlane,
                    errors: Callable[..., dict[int | str, dict[str, Any]]]) -> None:
    @app.put("/v1/sandboxes/{sandbox_id}/network", tags=["network"],
             responses=errors(400, 404, 409, 422, 502, 503, 504))
    def set_network(caller: Caller, sandbox_id: SandboxId, req: NetworkUpdate) -> SandboxOut:
        """New egress rules for a running sandbox (a list left out stays)."""
        return plane.set_network(sandbox_id, req, caller)

    # 400: an optional JSON body that does not parse (FastAPI's answer, as on create)
    @app.post("/v1/sandboxes/{sandbox_id}/previews/{port}", status_code=201, tags=["network"],
              responses=errors(400, 403, 404, 409, 422, 503))
    def create_preview(caller: Caller, sandbox_id: SandboxId, port: Port, request: Request,
                       req: PreviewRequest | None = None) -> PreviewOut:
        """A URL of the guest's ``port`` through the proxy, with a new preview token."""
        base = str(request.base_url).rstrip("/")
        return plane.create_preview(sandbox_id, port, public=(req or PreviewRequest()).public,
                                    caller=caller, base_url=base)
