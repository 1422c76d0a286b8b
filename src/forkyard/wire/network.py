"""A sandbox's network as the wire carries it: its mode and its egress rules.

One value travels unchanged from the SDK's ``Sandbox.create(network=...)``
through the control plane (which stores it with the sandbox, so forks and
wakes keep it) to the worker that applies it. Rules are data, never shell
or nftables text: each is a parsed CIDR or a validated domain name, so what
an API caller sends cannot become a command on the worker.

Rule semantics (docs/network.md): deny wins over allow; by default the
``DEFAULT_DENIED`` ranges (private, link-local, loopback, metadata,
multicast, reserved) are denied unless a rule allows them explicitly; every
other destination is allowed in ``outbound`` mode.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

__all__ = [
    "DEFAULT_DENIED",
    "MAX_RULES",
    "EgressRule",
    "NetworkMode",
    "NetworkSpec",
    "parse_rule",
]

MAX_RULES = 256  # per list: each becomes a set element on the worker, bounded like any input

# Destinations no sandbox reaches unless a rule allows them by name or range.
DEFAULT_DENIED: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, and 169.254.169.254: cloud metadata
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)

# RFC 1123 host names, lower-cased; an optional leading "*." covers subdomains
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}\.?$")


class NetworkMode(enum.StrEnum):
    NONE = "none"  # no network card at all: loopback only
    OUTBOUND = "outbound"  # a card behind NAT, egress under the rules


def parse_rule(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """A rule as a network, or as a normalised domain name; ValueError names what is wrong."""
    raw = text.strip()
    if not raw or len(raw) > 253:
        raise ValueError(f"egress rule {text[:60]!r}: expected a CIDR or a domain name")
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        pass
    name = raw.lower().rstrip(".")
    if not _DOMAIN_RE.match(name) or name.replace("*.", "").replace(".", "").isdigit():
        raise ValueError(f"egress rule {text[:60]!r}: expected a CIDR or a domain name")
    return name


def _normalise(text: str) -> str:
    return str(parse_rule(text))


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_NAME_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# what the schema promises is accepted: IPv4 CIDRs and domain names (IPv6 CIDRs are
# accepted too; the schema leaves them out rather than promise every spelling)
RULE_PATTERN = (rf"^(?:(?:{_OCTET}\.){{3}}{_OCTET}(?:/(?:3[0-2]|[12]?[0-9]))?"
                rf"|(?:\*\.)?(?:{_NAME_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.?)$")
_RULE_SCHEMA = {"type": "string", "maxLength": 253, "pattern": RULE_PATTERN,
                "description": "a CIDR (e.g. 10.0.0.0/8) or a domain name (`*.` for "
                               "its subdomains)"}

EgressRule = Annotated[str, Field(max_length=253), AfterValidator(_normalise),
                       WithJsonSchema(_RULE_SCHEMA)]


class NetworkSpec(BaseModel):
    """What a sandbox's network is; immutable, compared and stored as a whole."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: NetworkMode = NetworkMode.OUTBOUND
    allow_out: tuple[EgressRule, ...] = Field(default=(), max_length=MAX_RULES)
    deny_out: tuple[EgressRule, ...] = Field(default=(), max_length=MAX_RULES)

    def networks(self, which: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The CIDR rules of ``allow_out`` or ``deny_out``."""
        return [r for r in map(parse_rule, getattr(self, which)) if not isinstance(r, str)]

    def domains(self, which: str) -> list[str]:
        """The domain rules of ``allow_out`` or ``deny_out``."""
        return [r for r in map(parse_rule, getattr(self, which)) if isinstance(r, str)]
