"""Egress rules as nftables text, NIC profiles, the manifest's network, resolver bounds."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time
from pathlib import Path

import pytest

from forkyard.checkpoint import BootRef, Manifest, PartRef
from forkyard.errors import ManifestError
from forkyard.net import dns, rules
from forkyard.vm.cmdline import qemu_argv, standalone_argv
from forkyard.vm.devices import FORKYARD_V1, NET_PROFILE, device_profile
from forkyard.vm.machine import BootSpec, DiskChain, VMShape
from forkyard.wire.network import DEFAULT_DENIED, NetworkSpec

PROTECT = [ipaddress.IPv4Network("100.64.0.0/10"), ipaddress.IPv4Network("192.0.2.7/32")]


def _set(script: str, name: str) -> str:
    line = [ln for ln in script.splitlines() if ln.startswith(f"add element inet forkyard {name} ")]
    return line[0] if line else ""


def test_each_rule_list_becomes_its_set_replaced_in_one_script() -> None:
    spec = NetworkSpec(allow_out=("10.1.0.0/16", "example.com"),
                       deny_out=("203.0.113.0/24", "2001:db8::/32", "bad.example"))
    s = rules.update_script(spec, PROTECT)
    assert "10.1.0.0/16" in _set(s, "allow") and "example.com" not in s
    assert "203.0.113.0/24" in _set(s, "deny") and "2001:db8" not in s  # IPv4 only
    assert "192.0.2.7/32" in _set(s, "protect")
    denied = _set(s, "default_denied").split("{")[1].rstrip(" }").strip().split(", ")
    covered = [ipaddress.ip_network(n) for n in denied]
    for net in DEFAULT_DENIED:  # collapsed (224/4 + 240/4 = 224/3), all covered
        if ":" not in net:
            assert any(ipaddress.ip_network(net).subnet_of(c) for c in covered)
    # every set is flushed first: the script replaces, never adds to, the rules
    for name in ("protect", "deny", "allow", "default_denied", "dns_allow"):
        assert f"flush set inet forkyard {name}" in s
    # a denied name: DNS only through the worker's resolver
    assert "udp dport 53 reject" in s
    assert "dport 53" not in rules.update_script(NetworkSpec(), PROTECT)


def test_the_egress_chain_order_is_deny_first() -> None:
    table = rules.sandbox_ruleset(NetworkSpec(), PROTECT)
    chain = table.split("chain egress {")[1].split("}")[0]
    order = [w for w in ("@protect", "@deny", "@dns_allow", "@allow", "@default_denied")
             if w in chain]
    assert order == ["@protect", "@deny", "@dns_allow", "@allow", "@default_denied"]
    assert chain.index("@deny ") < chain.index("@allow ")
    # stale connections a fork inherits are reset, spoofed sources dropped
    assert "ct state invalid meta l4proto tcp reject with tcp reset" in table
    assert f"ip saddr != {rules.GUEST} drop" in table
    # a guest holds a bounded share of the host's conntrack memory; DNS costs none
    assert f"ct count over {rules.MAX_CONNECTIONS} reject" in table
    assert f"ip daddr {rules.NAMESERVER} udp dport 53 notrack" in table


def test_overlapping_ranges_collapse() -> None:
    spec = NetworkSpec(allow_out=("10.0.0.0/8", "10.1.0.0/16", "10.2.3.4/32"))
    assert _set(rules.update_script(spec, PROTECT), "allow").count("10.") == 1


def test_dns_answers_open_for_a_clamped_ttl() -> None:
    s = rules.dns_allow_script([("10.9.9.9", 5), ("10.9.9.8", 10**9), ("::1", 60)])
    assert "10.9.9.9 timeout 60s" in s and "10.9.9.8 timeout 3600s" in s and "::1" not in s
    assert rules.dns_allow_script([]) == ""
    with pytest.raises(ValueError):
        rules.dns_allow_script([("1.2.3.4; flush ruleset", 5)])


def test_nic_profile_renders_a_tap_for_forkyard_and_user_net_for_exports() -> None:
    shape = VMShape(256, 1, "pc-q35-7.2", "tcg", devices=NET_PROFILE.name, disk_size=1 << 30)
    argv = qemu_argv(name="sb", shape=shape, boot=BootSpec(Path("/k"), Path("/i")),
                     disk=DiskChain(Path("/b"), (), Path("/a")), top_node="top0", qmp_fd=3,
                     console_fd=4, agent_socket=Path("/s"), incoming=True, tap_fd=9)
    assert "tap,id=net0,fd=9" in argv
    assert any(a.startswith("virtio-net-pci,") and "netdev=net0" in a and "addr=0x6" in a
               for a in argv)
    plain = standalone_argv(shape, Path("/x.qcow2"), snapshot="s", agent_socket=Path("/s"))
    assert "user,id=net0" in plain
    v1 = VMShape(256, 1, "pc-q35-7.2", "tcg", disk_size=1 << 30)
    assert "-netdev" not in standalone_argv(v1, Path("/x"), snapshot="s", agent_socket=Path("/s"))
    # the NIC profile is the old one plus a card: a v1 checkpoint still restores
    assert device_profile("forkyard-v1") is FORKYARD_V1
    assert NET_PROFILE.devices[:-1] == FORKYARD_V1.devices


def _manifest(network: NetworkSpec | None) -> Manifest:
    shape = VMShape(256, 1, "pc-q35-7.2", "tcg", disk_size=1 << 30,
                    devices=(NET_PROFILE if network else FORKYARD_V1).name)
    from forkyard.checkpoint.chunks import ChunkRef
    return Manifest(
        created="2026-12-02T00:00:00Z", base=PartRef("a" * 64, 1 << 30), layers=(),
        state=PartRef("c" * 64, 200), state_chunks=(ChunkRef(0, 200, "c" * 64),),
        boot=BootRef(PartRef("d" * 64, 10), PartRef("e" * 64, 20), "console=ttyS0"),
        vm=shape, sandbox="sb-1", network=network,
    )


def test_the_manifest_carries_the_network_and_old_ones_have_none() -> None:
    spec = NetworkSpec(allow_out=("10.0.0.0/8",), deny_out=("bad.example",))
    m = _manifest(spec)
    assert Manifest.parse(m.canonical(), expect_id=m.id).network == spec
    old = _manifest(None)
    assert "network" not in json.loads(old.canonical())
    assert Manifest.parse(old.canonical()).network is None
    bad = json.loads(m.canonical())
    bad["network"] = {"mode": "outbound", "allow_out": ["1.2.3.4; drop"]}
    with pytest.raises(ManifestError):
        Manifest.from_json(bad)


# --- the resolver -----------------------------------------------------------
def _query(name: str, qid: int = 7) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def test_names_and_answers_parse_with_compression_and_refuse_loops() -> None:
    q = _query("www.Example.com")
    assert dns.question(q)[1] == "www.example.com"
    answer = q + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 42, 4) + bytes([10, 1, 2, 3])
    answer = answer[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + answer[12:]
    assert dns.answers_a(answer) == [("10.1.2.3", 42)]
    loop = _query("a")[:12] + b"\xc0\x0c" + b"\0\1\0\1"
    with pytest.raises(ValueError):
        dns.question(loop)
    assert dns.matches("a.b.example.com", ["example.com"])
    assert dns.matches("example.com", ["example.com"])
    assert not dns.matches("example.com", ["*.example.com"])
    assert not dns.matches("badexample.com", ["example.com"])


@pytest.fixture
def resolver_pair():
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    allowed: list[tuple[str, list[tuple[str, int]]]] = []
    r = dns.Resolver(upstream.getsockname(), on_allowed=lambda ns, a: allowed.append((ns, a)))
    served = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    served.bind(("127.0.0.1", 0))
    guest = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    guest.settimeout(5)
    yield r, upstream, served, guest, allowed
    r.close()
    for s in (upstream, served, guest):
        s.close()


def test_denied_names_get_nxdomain_and_allowed_answers_open(resolver_pair) -> None:
    r, upstream, served, guest, allowed = resolver_pair
    r.add("ns1", served, NetworkSpec(allow_out=("ok.example",), deny_out=("bad.example",)))
    guest.sendto(_query("x.bad.example", 99), served.getsockname())
    reply, _ = guest.recvfrom(512)
    assert struct.unpack_from("!H", reply)[0] == 99 and reply[3] & 0xF == 3
    guest.sendto(_query("ok.example", 5), served.getsockname())
    upstream.settimeout(5)
    q, src = upstream.recvfrom(512)
    assert q[2:] == _query("ok.example", 5)[2:]  # forwarded as sent, under a new id
    ans = q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + q[12:] + b"\xc0\x0c" + \
        struct.pack("!HHIH", 1, 1, 300, 4) + bytes([10, 7, 7, 7])
    upstream.sendto(ans, src)
    reply, _ = guest.recvfrom(512)
    assert struct.unpack_from("!H", reply)[0] == 5 and reply.endswith(bytes([10, 7, 7, 7]))
    assert allowed == [("ns1", [("10.7.7.7", 300)])]


def test_a_query_flood_is_bounded(resolver_pair) -> None:
    r, upstream, served, guest, _ = resolver_pair
    r.add("ns1", served, NetworkSpec())
    upstream.setblocking(False)
    for i in range(3000):
        guest.sendto(_query(f"n{i}.example", i), served.getsockname())
    guest.sendto(b"\0" * 4000, served.getsockname())  # oversized: dropped
    time.sleep(1.0)
    forwarded = 0
    while True:
        try:
            upstream.recvfrom(4096)
            forwarded += 1
        except BlockingIOError:
            break
    # never more waiting upstream than one sandbox's share, nothing answered
    assert 0 < forwarded <= dns.PER_SANDBOX
    assert r.pending() <= dns.PER_SANDBOX
    time.sleep(dns.TIMEOUT + 1.5)
    assert r.pending() == 0  # unanswered queries expire


def test_protected_keeps_host_addresses_but_not_the_veth_ends_that_come_and_go(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sandbox veths' host ends are inside the sandbox space (protected whole): listed
    one by one they would change the list, and reload a spare's rules, at every fork."""
    from types import SimpleNamespace

    from forkyard.net import plane
    from forkyard.tools import ip

    fake = SimpleNamespace(protect_extra=[ipaddress.IPv4Network("192.0.2.0/24")])
    hosts = ["10.0.2.15", "127.0.0.1", "100.64.16.1"]
    monkeypatch.setattr(ip, "addresses", lambda: list(hosts))
    first = plane.NetPlane.protected(fake)  # type: ignore[arg-type]
    assert first == [plane.SANDBOX_SPACE, ipaddress.IPv4Network("192.0.2.0/24"),
                     ipaddress.IPv4Network("10.0.2.15/32"),
                     ipaddress.IPv4Network("127.0.0.1/32")]
    hosts[2] = "100.64.16.5"  # one sandbox gone, another one come
    assert plane.NetPlane.protected(fake) == first  # type: ignore[arg-type]
    hosts.append("198.51.100.7")  # a new host address is protected at once
    assert ipaddress.IPv4Network("198.51.100.7/32") in plane.NetPlane.protected(fake)  # type: ignore[arg-type]
