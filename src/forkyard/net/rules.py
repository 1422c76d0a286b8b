"""A :class:`NetworkSpec` as the nftables rule set of one sandbox's namespace.

Rules are data all the way: every element written here is an address
rendered by :mod:`ipaddress` or a fixed name of this module, never text an
API caller sent, so a rule cannot inject nftables syntax.

Evaluation order of a new outbound connection from the guest (first match):

1. ``protect`` (the worker's and control plane's addresses, every other
   sandbox's range): rejected, whatever the rules say;
2. ``deny_out`` CIDRs: rejected (deny wins);
3. addresses an allowed domain resolved to (``dns_allow``, filled by the
   worker's resolver, each with a timeout): accepted;
4. ``allow_out`` CIDRs: accepted;
5. ``DEFAULT_DENIED``: rejected;
6. anything else: accepted.

Replies to accepted connections pass by conntrack.  A packet conntrack does
not know (``invalid``: mid-stream TCP with ``nf_conntrack_tcp_loose=0``, as
every connection a fork inherits from its checkpoint is) gets a TCP reset,
so the guest's side of a stale connection fails at once instead of hanging.
Only IPv4 is routed; the guest has no IPv6 route (its rules are ignored).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from forkyard.wire.network import DEFAULT_DENIED, NetworkSpec

__all__ = ["GATEWAY", "GUEST", "GUEST_PREFIX", "NAMESERVER", "TABLE", "dns_allow_script",
           "sandbox_ruleset", "update_script"]

TABLE = "forkyard"
# The same in every sandbox (each has its own namespace), so a fork resumes
# with a valid configuration.  These are QEMU user-mode networking's defaults
# too, so an exported checkpoint resumed with `-netdev user` keeps working.
GUEST = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"
NAMESERVER = "10.0.2.3"
GATEWAY_MAC = "52:55:0a:00:02:02"  # fixed: a fork's guest keeps its neighbour cache
TAP = "tap0"
UPLINK = "up0"
DNS_TIMEOUT_MIN, DNS_TIMEOUT_MAX = 60, 3600  # seconds an allowed domain's address stays open
# open connections a guest may hold through its NAT: conntrack entries are kernel
# memory shared by the whole host, so one guest must not be able to fill the table
MAX_CONNECTIONS = 4096

Net = ipaddress.IPv4Network


def _v4(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[Net]:
    return sorted({n for n in nets if isinstance(n, ipaddress.IPv4Network)},
                  key=lambda n: (int(n.network_address), n.prefixlen))


def _elements(nets: Sequence[Net]) -> str:
    return ", ".join(str(n) for n in ipaddress.collapse_addresses(nets))


def _set_lines(name: str, nets: Sequence[Net]) -> list[str]:
    lines = [f"flush set inet {TABLE} {name}"]
    if nets:
        lines.append(f"add element inet {TABLE} {name} {{ {_elements(nets)} }}")
    return lines


def update_script(spec: NetworkSpec, protect: Sequence[Net]) -> str:
    """The rule sets of ``spec``, replacing the current ones in one transaction."""
    default = _v4(ipaddress.ip_network(n) for n in DEFAULT_DENIED)
    lines = [
        *_set_lines("protect", _v4(protect)),
        *_set_lines("deny", _v4(spec.networks("deny_out"))),
        *_set_lines("allow", _v4(spec.networks("allow_out"))),
        *_set_lines("default_denied", default),
        # the domains may have changed: what they resolved to earlier no longer counts
        f"flush set inet {TABLE} dns_allow",
        f"flush chain inet {TABLE} dns",
    ]
    if spec.domains("deny_out"):
        # with a denied name, DNS goes only through the worker's resolver:
        # another resolver would answer the name (addresses stay reachable, see docs)
        lines += [f"add rule inet {TABLE} dns udp dport 53 reject",
                  f"add rule inet {TABLE} dns tcp dport 53 reject with tcp reset"]
    return "\n".join(lines) + "\n"


def sandbox_ruleset(spec: NetworkSpec, protect: Sequence[Net]) -> str:
    """The whole table of a new sandbox namespace (created, then filled, atomically)."""
    table = f"""
table inet {TABLE} {{
  set protect {{ type ipv4_addr; flags interval; }}
  set deny {{ type ipv4_addr; flags interval; }}
  set allow {{ type ipv4_addr; flags interval; }}
  set default_denied {{ type ipv4_addr; flags interval; }}
  set dns_allow {{ type ipv4_addr; flags timeout; size 4096; }}
  chain dns {{ }}
  chain egress {{
    ip daddr @protect reject with icmp type admin-prohibited
    ip daddr @deny reject with icmp type admin-prohibited
    jump dns
    ip daddr @dns_allow accept
    ip daddr @allow accept
    ip daddr @default_denied reject with icmp type admin-prohibited
    accept
  }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    # a spoofed source never gets past the guest's own port
    iifname "{TAP}" ip saddr != {GUEST} drop
    iifname "{TAP}" meta nfproto ipv6 drop
    # queries to the resolver are not tracked: a flood of them (each from its own
    # port) costs no conntrack entries; the resolver bounds what it takes
    iifname "{TAP}" ip daddr {NAMESERVER} udp dport 53 notrack
  }}
  chain output_raw {{
    type filter hook output priority raw; policy accept;
    ip saddr {NAMESERVER} udp sport 53 notrack
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid meta l4proto tcp reject with tcp reset
    ct state invalid drop
    iifname "{TAP}" ct state new ct count over {MAX_CONNECTIONS} reject
    iifname "{TAP}" oifname "{UPLINK}" jump egress
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{TAP}" ip daddr {NAMESERVER} udp dport 53 accept
    iifname "{TAP}" ct state established,related accept
    iifname "{TAP}" meta l4proto tcp reject with tcp reset
    iifname "{TAP}" drop
    iifname "{UPLINK}" ct state established,related accept
    iifname "{UPLINK}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{UPLINK}" masquerade
  }}
}}
"""
    return table + update_script(spec, protect)


def dns_allow_script(addresses: Iterable[tuple[str, int]]) -> str:
    """Open what an allowed domain resolved to, each for its (clamped) TTL."""
    items = []
    for addr, ttl in addresses:
        a = ipaddress.ip_address(addr)
        if isinstance(a, ipaddress.IPv4Address):
            t = min(max(ttl, DNS_TIMEOUT_MIN), DNS_TIMEOUT_MAX)
            items.append(f"{a} timeout {t}s")
    if not items:
        return ""
    return f"add element inet {TABLE} dns_allow {{ {', '.join(items)} }}\n"
