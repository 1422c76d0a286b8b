"""nftables' ``nft``: rule sets applied as one transaction (``nft -f -``).

A script given to :func:`apply` is all or nothing: nft checks the whole of it
and commits it atomically, so a sandbox never runs under half of a rule change.
``netns`` runs it inside a network namespace (``ip netns exec``), whose
nftables are that namespace's own.
"""

from __future__ import annotations

from forkyard._proc import run

__all__ = ["apply", "delete_table"]

_TIMEOUT = 30.0


def _argv(netns: str | None, *args: str) -> list[str]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    return [*pre, "nft", *args]


def apply(script: str, *, netns: str | None = None) -> None:
    run(_argv(netns, "-f", "-"), input=script.encode(), timeout=_TIMEOUT, what="nft -f")


def delete_table(family: str, name: str, *, netns: str | None = None) -> None:
    """Remove a table if it exists."""
    run(_argv(netns, "delete", "table", family, name), timeout=_TIMEOUT, check=False)
