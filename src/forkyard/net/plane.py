"""The worker's side of sandbox networks: one namespace per sandbox, NAT, rules.

Layout (docs/network.md has the picture)::

    guest eth0 10.0.2.15/24 ──virtio-net── QEMU (own empty netns, holds the TAP fd)
        │ TAP fd
    netns fyBBB-SSS:  tap0 10.0.2.2/24 + 10.0.2.3 (DNS)   up0 100.64.x.2/30
        │ veth                       nftables: egress rules, NAT, reset of stale TCP
    host netns:       fyBBBSSS 100.64.x.1/30 ── routes/masquerades to the world

Why this shape:

- **One namespace per sandbox**, created by the worker, holding the TAP the
  guest's NIC is plugged into.  Every guest gets the *same* address and
  gateway, so a fork of any checkpoint resumes with a configuration that is
  valid in its own new namespace, and two forks listening on one port never
  clash.  Conntrack starts empty in each namespace: connections a fork
  inherits are unknown there and get reset (``rules``).
- **QEMU stays jailed** in its own empty network namespace, as an
  unprivileged uid: it only receives an fd of the TAP (opened here, as
  root, inside the sandbox's namespace) and never sees a network device.
- **A veth with a /30 of its own** (``100.64.0.0/10``, carrier-grade NAT
  space, denied to every guest) connects each namespace to the host, which
  masquerades the sandbox's traffic out.  Each worker claims a /20 block
  (1024 sandboxes) by an flock under ``/run/forkyard/net``, so workers on
  one machine never pick the same addresses or names, and a worker starting
  on a block removes whatever a dead predecessor left of it.
- **A spare namespace, built ahead.**  Making a namespace (veth, TAP,
  the rule table, a DNS socket) is five tool runs, ~25 ms on a loaded
  2-core machine, on the path of every fork with a NIC.  The plane keeps
  ``spares`` of them ready, built by a background thread between forks, and
  :meth:`NetPlane.attach` only puts the sandbox's rules in force (one
  ``nft -f``; none for the default rules it was built with) and hands its
  DNS socket to the resolver.  A spare carries the default rules, and no VM
  is plugged into it before ``attach``, so nothing ever flows under rules
  it was not given.
- **nftables**, not iptables: a sandbox's rule change is one ``nft -f``
  transaction inside its namespace, atomic, with sets for the ranges.
  The host table drops anything a sandbox's veth sends to the host itself
  (the worker daemon, the control plane, services on loopback) and anything
  from one sandbox's veth to another's.

Everything here needs root (namespaces, veths, nftables); a worker that is
not root has no networks (``NetPlane.available``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from forkyard.errors import (
    InsufficientCapacity,
    NetworkConflict,
    PortUnreachable,
    SetupError,
    ToolError,
)
from forkyard.net import _ns, rules
from forkyard.net.dns import Resolver, upstream_from_resolv_conf
from forkyard.tools import ip, nft
from forkyard.wire.network import NetworkMode, NetworkSpec

__all__ = ["NetPlane", "SandboxNet"]

log = logging.getLogger("forkyard.net")

LOCK_DIR = Path("/run/forkyard/net")
SANDBOX_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
_REFILL_DELAY = 0.3  # seconds between handing out a spare and building the next
_BLOCK_BITS = 12  # a /20 per worker: 1024 sandboxes of a /30 each
_BLOCKS = 1 << (32 - SANDBOX_SPACE.prefixlen - _BLOCK_BITS)
SLOTS = 1 << (_BLOCK_BITS - 2)


class NetPlane:
    """The networks of one worker's sandboxes; :meth:`close` removes all of them."""

    def __init__(self, key: str, *, dns_upstream: tuple[str, int] | None = None,
                 protect: Sequence[str] = (), spares: int = 1) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()
        self._spares: list[SandboxNet] = []
        self._want_spares = spares
        self._refill = threading.Condition(self._lock)
        self._keeper: threading.Thread | None = None
        self._closing = False
        self._lock_fd: int | None = None
        self.block = -1
        self.available = os.geteuid() == 0
        self.protect_extra = [ipaddress.IPv4Network(p, strict=False) for p in protect]
        self.dns_upstream = dns_upstream or upstream_from_resolv_conf()
        self.resolver: Resolver | None = None
        if not self.available:
            return
        self._claim(key)
        try:
            self._sweep()
            self._host_setup()
        except BaseException:
            self.close()
            raise
        self.resolver = Resolver(self.dns_upstream, on_allowed=self._dns_allowed)
        if spares > 0:
            self._keeper = threading.Thread(target=self._keep_spares, daemon=True,
                                            name=f"net-spares-{self.prefix}")
            self._keeper.start()

    # ------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """What every kernel object of this worker's networks is named after."""
        return f"fy{self.block:03x}"

    @property
    def block_net(self) -> ipaddress.IPv4Network:
        base = int(SANDBOX_SPACE.network_address) + (self.block << _BLOCK_BITS)
        return ipaddress.IPv4Network((base, 32 - _BLOCK_BITS))

    def _claim(self, key: str) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % _BLOCKS
        for i in range(_BLOCKS):
            block = (start + i) % _BLOCKS
            fd = os.open(LOCK_DIR / f"block-{block:03x}.lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.block = fd, block
            return
        raise SetupError("every sandbox network block of this machine is taken")

    def _sweep(self) -> None:
        """Whatever a dead worker left of this block (we hold its lock: nobody uses it)."""
        for name in ip.netns_names():
            if name.startswith(self.prefix + "-"):
                ip.netns_delete(name)
        stale = [n for n in ip.link_names() if n.startswith(self.prefix)]
        if stale:
            ip.batch([f"link delete {n}" for n in stale], force=True)
        nft.delete_table("inet", self._host_table)

    @property
    def _host_table(self) -> str:
        return f"forkyard-{self.block:03x}"

    def _host_setup(self) -> None:
        try:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
        except OSError as exc:
            raise SetupError(f"cannot enable IPv4 forwarding: {exc}") from exc
        p = self.prefix
        nft.apply(f"""
table inet {self._host_table} {{
  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname "{p}*" ct state established,related accept
    iifname "{p}*" drop
  }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname "fy*" oifname "fy*" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {self.block_net} oifname != "fy*" masquerade
  }}
}}
""")

    def protected(self) -> list[ipaddress.IPv4Network]:
        """Never reachable from a sandbox: every sandbox range, this host's addresses."""
        nets = [SANDBOX_SPACE, *self.protect_extra]
        for addr in ip.addresses():
            net = ipaddress.IPv4Network(addr)
            # the host ends of sandbox veths come and go with every namespace: left
            # in, they would change this list (and reload a spare's rules) each time
            if not net.subnet_of(SANDBOX_SPACE) and net not in nets:
                nets.append(net)
        return nets

    # ------------------------------------------------------------------
    def attach(self, sandbox_id: str, spec: NetworkSpec) -> SandboxNet:
        """A new namespace for one VM of ``sandbox_id`` with ``spec``'s rules in force."""
        if spec.mode is not NetworkMode.OUTBOUND:
            raise NetworkConflict(f"sandbox {sandbox_id!r} has network mode none")
        if not self.available:
            raise SetupError("sandbox networks need a worker running as root")
        with self._lock:
            spare = self._spares.pop() if self._spares else None
            self._refill.notify()
        if spare is not None:
            try:
                spare.assign(sandbox_id, spec)
            except BaseException:
                spare.close()
                raise
            return spare
        return self._build(sandbox_id, spec)

    def _build(self, sandbox_id: str | None, spec: NetworkSpec) -> SandboxNet:
        with self._lock:
            free = next((s for s in range(SLOTS) if s not in self._used), None)
            if free is None:
                raise InsufficientCapacity(f"all {SLOTS} sandbox networks of this worker are "
                                           "in use", resource="sandboxes", limit=SLOTS)
            self._used.add(free)
        try:
            return SandboxNet(self, sandbox_id, free, spec)
        except BaseException:
            with self._lock:
                self._used.discard(free)
            raise

    def _keep_spares(self) -> None:
        """Keep ``spares`` namespaces built (the background thread of this plane)."""
        while True:
            with self._lock:
                while not self._closing and len(self._spares) >= self._want_spares:
                    self._refill.wait()
                    # not at once: the VM that took the spare is starting now, and
                    # building beside it (two cores) slowed that fork by ~15 ms here
                    self._refill.wait(_REFILL_DELAY)
                if self._closing:
                    return
            try:
                net = self._build(None, NetworkSpec())
            except Exception as exc:  # a full block or a failing tool: attach builds then
                log.warning("could not build a spare sandbox network: %s", exc)
                with self._lock:
                    self._refill.wait(5.0)
                continue
            with self._lock:
                if not self._closing:
                    self._spares.append(net)
                    continue
            net.close()
            return

    def _release(self, slot: int) -> None:
        with self._lock:
            self._used.discard(slot)

    def _dns_allowed(self, netns: str, answers: list[tuple[str, int]]) -> None:
        script = rules.dns_allow_script(answers)
        if script:
            try:
                nft.apply(script, netns=netns)
            except ToolError as exc:  # the sandbox went meanwhile
                log.debug("dns allow in %s: %s", netns, exc)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._refill.notify_all()
            spares, self._spares = self._spares, []
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        for net in spares:
            net.close()
        if self.resolver is not None:
            self.resolver.close()
            self.resolver = None
        if self._lock_fd is None:
            return
        with contextlib.suppress(ToolError, SetupError):
            self._sweep()
        os.close(self._lock_fd)
        self._lock_fd = None


class SandboxNet:
    """One VM's network namespace: TAP, veth, rules; :meth:`close` removes it all."""

    def __init__(self, plane: NetPlane, sandbox_id: str | None, slot: int,
                 spec: NetworkSpec) -> None:
        """Build it; with ``sandbox_id`` None, a spare that :meth:`assign` gives out later."""
        self.plane = plane
        self.sandbox_id = sandbox_id or ""  # "": a spare, nobody's yet
        self.slot = slot
        self.spec = spec
        self.netns = f"{plane.prefix}-{slot:03x}"
        self.host_if = f"{plane.prefix}{slot:03x}"
        base = int(plane.block_net.network_address) + 4 * slot
        host_addr, ns_addr = ipaddress.IPv4Address(base + 1), ipaddress.IPv4Address(base + 2)
        self.tap_fd: int | None = None
        self._dns: socket.socket | None = None
        ip.netns_add(self.netns)
        try:
            ip.batch([
                f"link add {self.host_if} type veth peer name {rules.UPLINK} netns {self.netns}",
                f"addr add {host_addr}/30 dev {self.host_if}",
                f"link set {self.host_if} up",
            ])
            ip.batch([
                "link set lo up",
                f"tuntap add dev {rules.TAP} mode tap",
                f"link set {rules.TAP} address {rules.GATEWAY_MAC}",
                f"addr add {rules.GATEWAY}/{rules.GUEST_PREFIX} dev {rules.TAP}",
                f"addr add {rules.NAMESERVER}/32 dev {rules.TAP}",
                f"link set {rules.TAP} up",
                f"addr add {ns_addr}/30 dev {rules.UPLINK}",
                f"link set {rules.UPLINK} up",
                f"route add default via {host_addr}",
            ], netns=self.netns)
            self._protect = plane.protected()
            nft.apply(rules.sandbox_ruleset(spec, self._protect), netns=self.netns)
            # conntrack is loaded now (the table's ct rules): mid-stream TCP it does
            # not know is invalid (and reset), never adopted as a new connection
            _ns.sysctl(self.netns, {"net/ipv4/ip_forward": "1",
                                    "net/netfilter/nf_conntrack_tcp_loose": "0"})
            self.tap_fd = _ns.open_tap(self.netns, rules.TAP)
            if plane.resolver is not None:
                self._dns = _ns.udp_socket(self.netns, (rules.NAMESERVER, 53))
                if sandbox_id is not None:
                    plane.resolver.add(self.netns, self._dns, spec)
        except BaseException:
            self.close()
            raise

    def assign(self, sandbox_id: str, spec: NetworkSpec) -> None:
        """A spare becomes ``sandbox_id``'s: its rules in force, its resolver answering."""
        # rules first; the host's addresses (protected) may have changed since it was
        # built.  The same rules on the same addresses are in force already: loading
        # them again would cost as much as building the namespace.
        protect = self.plane.protected()
        if spec != self.spec or protect != self._protect:
            nft.apply(rules.update_script(spec, protect), netns=self.netns)
            self._protect = protect
        self.sandbox_id, self.spec = sandbox_id, spec
        if self.plane.resolver is not None and self._dns is not None:
            self.plane.resolver.add(self.netns, self._dns, spec)

    def apply(self, spec: NetworkSpec) -> None:
        """Replace the rules in force (one transaction); the mode cannot change."""
        if spec.mode is not self.spec.mode:
            raise NetworkConflict(f"sandbox {self.sandbox_id!r}: a running sandbox keeps its "
                                  f"network mode ({self.spec.mode.value})")
        self._protect = self.plane.protected()
        nft.apply(rules.update_script(spec, self._protect), netns=self.netns)
        if self.plane.resolver is not None:
            self.plane.resolver.update(self.netns, spec)
        self.spec = spec

    def connect(self, port: int, *, timeout: float) -> socket.socket:
        """A TCP connection from the sandbox's namespace to ``port`` of the guest."""
        if not 0 < port < 65536:
            raise PortUnreachable(self.sandbox_id, port, "not a TCP port number")
        sock = _ns.tcp_socket(self.netns)
        sock.settimeout(timeout)
        try:
            sock.connect((rules.GUEST, port))
        except ConnectionRefusedError:
            sock.close()
            raise PortUnreachable(self.sandbox_id, port, "nothing listens there") from None
        except OSError as exc:
            sock.close()
            raise PortUnreachable(self.sandbox_id, port, str(exc) or "timed out") from exc
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        if self._dns is not None:
            if self.plane.resolver is not None:
                self.plane.resolver.remove(self.netns)
            self._dns.close()
            self._dns = None
        if self.tap_fd is not None:
            os.close(self.tap_fd)
            self.tap_fd = None
        with contextlib.suppress(ToolError):
            ip.netns_delete(self.netns)
        with contextlib.suppress(ToolError):
            if self.host_if in ip.link_names():
                ip.batch([f"link delete {self.host_if}"], force=True)
        self.plane._release(self.slot)

