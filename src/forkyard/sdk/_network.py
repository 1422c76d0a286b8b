"""A sandbox's network from the SDK: ``sb.network`` (mode, rules, ``update``), preview URLs.

E2B's names where they fit: ``allow_out``/``deny_out`` for egress rules (CIDRs
or domain names; deny wins), ``get_url(port)`` for a guest port from outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from forkyard.sdk import _ops
from forkyard.sdk.models import NetworkInfo

# the sandbox handle (sync or async) these belong to: ``_http``, ``id``, ``info`` and
# its ``_info`` to refresh; typed loosely so that this module imports neither handle
Handle = Any

__all__ = ["AsyncNetwork", "Network", "preview_url"]


def preview_url(base: str, data: dict[str, Any]) -> str:
    """The preview URL on the address this client reaches the control plane at."""
    parts = urlsplit(str(data["url"]))
    return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


class _Spec:
    _info: NetworkInfo | None

    @property
    def spec(self) -> NetworkInfo:
        """As the control plane last answered (a sandbox from before networks: none)."""
        return self._info or NetworkInfo(mode="none")

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def allow_out(self) -> tuple[str, ...]:
        return self.spec.allow_out

    @property
    def deny_out(self) -> tuple[str, ...]:
        return self.spec.deny_out

    def __repr__(self) -> str:
        s = self.spec
        return f"<Network {s.mode} allow_out={list(s.allow_out)} deny_out={list(s.deny_out)}>"


class Network(_Spec):
    def __init__(self, sandbox: Handle) -> None:
        self._sandbox = sandbox
        self._info = sandbox.info.network

    def update(self, *, allow_out: Sequence[str] | None = None,
               deny_out: Sequence[str] | None = None) -> NetworkInfo:
        """Replace the running sandbox's allow and/or deny rules (a list left out stays)."""
        info = self._sandbox._http.call(_ops.set_network(self._sandbox.id, allow_out, deny_out))
        self._sandbox._info = info
        self._info = info.network
        return self.spec


class AsyncNetwork(_Spec):
    def __init__(self, sandbox: Handle) -> None:
        self._sandbox = sandbox
        self._info = sandbox.info.network

    async def update(self, *, allow_out: Sequence[str] | None = None,
                     deny_out: Sequence[str] | None = None) -> NetworkInfo:
        info = await self._sandbox._http.call(
            _ops.set_network(self._sandbox.id, allow_out, deny_out))
        self._sandbox._info = info
        self._info = info.network
        return self.spec
