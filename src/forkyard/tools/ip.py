"""iproute2's ``ip``: network namespaces, veth pairs, TAP devices, addresses, routes.

Commands go in batches (``ip -batch -``): one process per step of a
sandbox's network instead of one per link or address, which keeps forks fast.
"""

from __future__ import annotations

import json

from forkyard._proc import run
from forkyard.errors import ToolError

__all__ = ["addresses", "batch", "link_names", "netns_add", "netns_delete", "netns_names"]

_TIMEOUT = 30.0


def netns_add(name: str) -> None:
    run(["ip", "netns", "add", name], timeout=_TIMEOUT, what="ip netns add")


def netns_delete(name: str) -> None:
    """Delete a namespace (its devices go with it); one that is gone already is fine."""
    done = run(["ip", "netns", "delete", name], timeout=_TIMEOUT, check=False)
    if done.returncode != 0 and name in netns_names():
        raise ToolError("ip netns delete", argv=done.argv, returncode=done.returncode,
                        stderr=done.stderr.decode("utf-8", "replace"))


def netns_names() -> list[str]:
    done = run(["ip", "-j", "netns", "list"], timeout=_TIMEOUT, check=False)
    try:
        data = json.loads(done.text or "[]")
    except ValueError:
        return []
    return [str(d["name"]) for d in data if isinstance(d, dict) and "name" in d]


def link_names(netns: str | None = None) -> list[str]:
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "link", "show"]
    try:
        data = json.loads(run(argv, timeout=_TIMEOUT).text or "[]")
    except ValueError:
        return []
    return [str(d["ifname"]) for d in data if isinstance(d, dict) and "ifname" in d]


def batch(lines: list[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run ``ip`` commands (without the leading ``ip``), optionally inside ``netns``.

    ``force`` goes on past a failing line (cleanup: remove what exists).
    """
    argv = ["ip", *(["-n", netns] if netns else []), *(["-force"] if force else []),
            "-batch", "-"]
    run(argv, input=("\n".join(lines) + "\n").encode(), timeout=_TIMEOUT, check=not force,
        what="ip -batch")


def addresses() -> list[str]:
    """The IPv4 addresses of this host's interfaces."""
    try:
        data = json.loads(run(["ip", "-j", "-4", "addr", "show"], timeout=_TIMEOUT).text or "[]")
    except ValueError:
        return []
    return [str(a["local"]) for link in data if isinstance(link, dict)
            for a in link.get("addr_info", []) if a.get("family") == "inet" and a.get("local")]
