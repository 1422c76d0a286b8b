"""A sandbox's network in the control plane: changing its rules, and who may reach its ports.

The spec is stored with the sandbox (forks copy their source's, wakes send
it along); a rule change goes to the worker first and is recorded only once
the worker applied it, so the stored spec is always what the guest has.

Guest ports are reached through the proxy (:mod:`._proxy`) by one of: the
API key of the sandbox's tenant (or an admin's), a *preview token* of that
sandbox and port, or nothing at all for a port made public -- and that only
where the operator enabled public ports.  Tokens are 256 random bits, shown
once and kept as their sha256; a check compares the digest with each stored
one of that port in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from forkyard.control._db import PreviewTokenRow, SandboxRow, utcnow
from forkyard.control._records import SYSTEM, sandbox_out, sandbox_row, stored_spec
from forkyard.control._transitions import Transitions, refused
from forkyard.control._workers import WorkerClient
from forkyard.errors import Forbidden, NetworkConflict, PreviewUnauthorized, SandboxNotFound
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.models import SandboxOut, SandboxState, dump
from forkyard.wire.network import NetworkMode, NetworkSpec
from forkyard.wire.ports import TOKEN_PARAM, NetworkUpdate, PreviewOut

__all__ = ["MAX_TOKENS", "Networks", "port_path"]

S = SandboxState
MAX_TOKENS = 32  # per sandbox port: a new one past this retires the oldest
_TOKEN_PREFIX = "fyp_"  # noqa: S105 - a prefix, not a secret


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def port_path(sandbox_id: str, port: int) -> str:
    return f"/v1/sandboxes/{sandbox_id}/ports/{port}/"


class Networks(Transitions):
    public_ports_enabled: bool = False  # the operator's choice (``forkyard server --public-ports``)

    def set_network(self, sandbox_id: str, req: NetworkUpdate, caller: Principal) -> SandboxOut:
        client = self.running(sandbox_id, "change the network of", caller)
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller)
            current = stored_spec(row.network) or NetworkSpec(mode=NetworkMode.NONE)
        if current.mode == NetworkMode.NONE:
            raise NetworkConflict(f"sandbox {sandbox_id} was made with network 'none': it has "
                                  "no network card to apply egress rules to")
        spec = current.model_copy(update={
            k: v for k, v in (("allow_out", req.allow_out), ("deny_out", req.deny_out))
            if v is not None})
        spec = NetworkSpec.model_validate(dump(spec))  # the copy is validated like a request
        client.send(worker_api.set_network(sandbox_id, spec))
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller, lock=True)
            row.network = dump(spec)
            row.updated = utcnow()
            return sandbox_out(row)

    # --- preview URLs -------------------------------------------------------------------
    def create_preview(self, sandbox_id: str, port: int, *, public: bool,
                       caller: Principal, base_url: str) -> PreviewOut:
        """A new preview token of ``port`` (or, with ``public``, the port made public)."""
        if public and not self.public_ports_enabled:
            raise Forbidden("public ports are not enabled on this control plane "
                            "(the operator starts it with --public-ports)")
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller, lock=True)
            if row.state == S.DESTROYED:
                raise refused(sandbox_id, row.state, "open a port of")
            path = port_path(sandbox_id, port)
            if public:
                row.public_ports = sorted({*(row.public_ports or []), port})
                return PreviewOut(sandbox=sandbox_id, port=port, url=base_url + path,
                                  token=None, public=True)
            token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
            s.add(PreviewTokenRow(digest=_digest(token), sandbox=sandbox_id, port=port,
                                  created=utcnow()))
            old = list(s.scalars(select(PreviewTokenRow).where(
                PreviewTokenRow.sandbox == sandbox_id, PreviewTokenRow.port == port)
                .order_by(PreviewTokenRow.created.desc())))
            for stale in old[MAX_TOKENS:]:
                s.delete(stale)
        return PreviewOut(sandbox=sandbox_id, port=port,
                          url=f"{base_url}{path}?{TOKEN_PARAM}={token}", token=token,
                          public=False)

    def port_target(self, sandbox_id: str, port: int, *, principal: Principal | None,
                    token: str | None) -> WorkerClient:
        """The worker to tunnel through, once the caller may reach ``port``.

        ``principal`` is the caller's API key (already resolved), ``token`` a
        preview token; with neither, only a public port opens.  Every refusal
        of a stranger is the same 401, whether the sandbox exists or not.
        """
        with self.db.tx() as s:
            if principal is not None:
                row = sandbox_row(s, sandbox_id, caller=principal)
            else:
                row = self._row_for_token(s, sandbox_id, port, token)
            if row.state != S.RUNNING:
                raise refused(sandbox_id, row.state, "reach a port of",
                              "; wake it first" if row.state == S.HIBERNATED else "")
            return self.workers.client(s, row.worker)

    def _row_for_token(self, s: Session, sandbox_id: str, port: int,
                       token: str | None) -> SandboxRow:
        try:
            row: SandboxRow | None = sandbox_row(s, sandbox_id, caller=SYSTEM)
        except SandboxNotFound:
            row = None
        if row is not None and token is None and self.public_ports_enabled \
                and port in (row.public_ports or []):
            return row
        if row is not None and token is not None:
            given = _digest(token)
            stored = s.scalars(select(PreviewTokenRow.digest).where(
                PreviewTokenRow.sandbox == sandbox_id, PreviewTokenRow.port == port))
            # every stored digest is compared, each in constant time
            if sum(hmac.compare_digest(given, d) for d in stored) > 0:
                return row
        raise PreviewUnauthorized("a guest port needs the sandbox's API key, a preview "
                                  "token of that port, or a public port"
                                  if token is None else "invalid preview token")
