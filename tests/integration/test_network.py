"""Sandbox networks with real guests against a test-built "internet" (tests/fixtures/internet).

One worker, two boots (a sandbox with a network and one with none); every
other sandbox is a fork.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from forkyard.errors import NetworkConflict, PortUnreachable
from forkyard.tools import ip
from forkyard.wire.network import NetworkMode, NetworkSpec
from tests.fixtures.internet import NAME, PRIV_NAME, PRIVATE, PUBLIC, internet

pytestmark = pytest.mark.vm


@contextlib.contextmanager
def forked(worker, cp, **kwargs):
    """A fork of ``cp``, destroyed after the block."""
    f = worker.fork(cp, **kwargs)
    try:
        yield f
    finally:
        f.destroy()


def fetch(sb, url: str) -> str:
    """What the guest's wget gets from ``url`` ('' if it fails)."""
    r = sb.exec(f"timeout 10 wget -q -O - {url}", timeout=30)
    return r.stdout if r.exit_code == 0 else ""


def http_get(sock: socket.socket, path: str = "/") -> bytes:
    sock.settimeout(20)
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    return bytes(out)


@pytest.fixture(scope="module")
def inet():
    with internet("t") as net:
        yield net


@pytest.fixture(scope="module")
def worker(tmp_path_factory, inet):
    from forkyard.worker import Worker

    w = Worker(tmp_path_factory.mktemp("net") / "home", name="net", dns_upstream=inet.dns)
    yield w
    prefix = w.net.prefix
    w.close()
    # nothing of this worker's networks is left in the kernel
    assert not [n for n in ip.netns_names() if n.startswith(prefix)]
    assert not [n for n in ip.link_names() if n.startswith(prefix)]


@pytest.fixture(scope="module")
def sb(worker):
    s = worker.create("minimal")
    s.exec("mkdir -p /tmp/www && echo parent > /tmp/www/index.html && httpd -p 8000 -h /tmp/www")
    return s


@pytest.fixture(scope="module")
def sb_none(worker):
    return worker.create("minimal", network=NetworkSpec(mode=NetworkMode.NONE))


def test_outbound_reaches_the_internet_and_none_has_no_card(sb, sb_none):
    assert sb.network == NetworkSpec()
    assert fetch(sb, f"http://{PUBLIC}/") == f"hello from {PUBLIC}\n"
    assert sb_none.network is None
    assert "eth0" not in sb_none.exec("ip link").stdout
    assert fetch(sb_none, f"http://{PUBLIC}/") == ""
    with pytest.raises(NetworkConflict):
        sb_none.connect_port(80, timeout=5)
    with pytest.raises(NetworkConflict):
        sb_none.set_network(NetworkSpec(allow_out=("10.0.0.0/8",)))


def test_rules_change_on_a_running_sandbox(sb):
    try:
        # private ranges are denied by default ...
        assert fetch(sb, f"http://{PRIVATE}/") == ""
        # ... and an allowed range opens
        sb.set_network(NetworkSpec(allow_out=("10.213.0.0/16",)))
        assert fetch(sb, f"http://{PRIVATE}/") == f"hello from {PRIVATE}\n"
        # deny wins over allow
        sb.set_network(NetworkSpec(allow_out=("10.0.0.0/8",), deny_out=(f"{PRIVATE}/32",)))
        assert fetch(sb, f"http://{PRIVATE}/") == ""
        # a public host denied
        sb.set_network(NetworkSpec(deny_out=("203.0.113.0/24",)))
        assert fetch(sb, f"http://{PUBLIC}/") == ""
        with pytest.raises(NetworkConflict):
            sb.set_network(NetworkSpec(mode=NetworkMode.NONE))
    finally:
        sb.set_network(NetworkSpec())
    assert fetch(sb, f"http://{PUBLIC}/") == f"hello from {PUBLIC}\n"


def test_domain_rules_through_the_workers_resolver(sb):
    try:
        assert fetch(sb, f"http://{NAME}/") == f"hello from {PUBLIC}\n"
        sb.set_network(NetworkSpec(deny_out=(NAME,)))
        r = sb.exec(f"nslookup {NAME}", timeout=30)
        assert PUBLIC not in r.stdout
        # another resolver is no way around a denied name
        r = sb.exec(f"nslookup {NAME} {PUBLIC}", timeout=30)
        assert PUBLIC not in r.stdout.split("answer:")[-1]
        # an allowed name opens its address inside a range denied by default
        sb.set_network(NetworkSpec(allow_out=(PRIV_NAME,)))
        assert fetch(sb, f"http://{PRIVATE}/") == ""
        assert fetch(sb, f"http://{PRIV_NAME}/") == f"hello from {PRIVATE}\n"
    finally:
        sb.set_network(NetworkSpec())


def test_a_sandbox_reaches_neither_the_host_nor_other_sandboxes(worker, sb, inet):
    # services of the host: on every address, on loopback only, and the other
    # sandbox's end of its link; even a rule allowing everything opens none
    anywhere = socket.socket()
    anywhere.bind(("0.0.0.0", 0))
    anywhere.listen(4)
    loop = socket.socket()
    loop.bind(("127.0.0.1", 0))
    loop.listen(4)
    other = worker.fork(sb.checkpoint(name="other"))
    try:
        sb.set_network(NetworkSpec(allow_out=("0.0.0.0/0",)))
        hosts = ["203.0.113.1", "10.0.2.2", _addr_of(other), *ip.addresses()]
        port, lport = anywhere.getsockname()[1], loop.getsockname()[1]
        for h in sorted(set(hosts)):
            for p in (port, lport):
                r = sb.exec(f"echo x | timeout 5 nc {h} {p}", timeout=30)
                assert r.exit_code != 0, f"reached {h}:{p}"
        # the other sandbox's listener, through its namespace's addresses
        for h in _addr_of(other, both=True):
            r = sb.exec(f"echo x | timeout 5 nc {h} 8000", timeout=30)
            assert r.exit_code != 0, f"reached {h}:8000"
        # a spoofed source address gets nowhere
        sb.exec("ip addr add 10.0.2.99/24 dev eth0")
        r = sb.exec(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc -s 10.0.2.99 {PUBLIC} 80",
                    timeout=30)
        assert "hello" not in r.stdout
    finally:
        sb.exec("ip addr del 10.0.2.99/24 dev eth0")
        sb.set_network(NetworkSpec())
        other.destroy()
        anywhere.close()
        loop.close()


def _addr_of(sb, both: bool = False):
    base = sb._net.plane.block_net.network_address + 4 * sb._net.slot
    return [str(base + 1), str(base + 2)] if both else str(base + 1)


def _until(attempt, retry_on, within: float = 30.0):
    """``attempt()``'s first truthy result, retrying on ``retry_on`` (a guest program
    started in the background listens or connects a moment later, later still under load)."""
    deadline = time.monotonic() + within
    while True:
        try:
            got = attempt()
        except retry_on:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {attempt}")
        time.sleep(0.2)


def test_connect_port_reaches_a_guest_listener(sb):
    assert http_get(sb.connect_port(8000, timeout=10)).endswith(b"parent\n")
    with pytest.raises(PortUnreachable):
        sb.connect_port(8001, timeout=10)
    with pytest.raises(PortUnreachable):
        sb.connect_port(0, timeout=10)


def test_forks_each_have_their_own_network_and_stale_connections_reset(worker, sb):
    # open at checkpoint time: the worker into the guest, and the guest out
    inbound_pid = int(sb.exec("nc -l -p 9000 >/dev/null 2>&1 & echo $!").stdout)
    held = _until(lambda: sb.connect_port(9000, timeout=10), PortUnreachable)
    outbound_pid = int(sb.exec(f"sleep 600 | nc {PUBLIC} 80 >/dev/null 2>&1 & echo $!").stdout)
    _until(lambda: "ESTAB" in sb.exec("netstat -tn").stdout, ())
    cp = sb.checkpoint(name="with-connections")
    forks = [worker.fork(cp), worker.fork(cp)]
    try:
        assert all(f.network == sb.network for f in forks)
        assert forks[0]._net.netns != forks[1]._net.netns
        for i, f in enumerate(forks):
            f.files.write("/tmp/www/index.html", f"fork {i}\n")
        for i, f in enumerate(forks):
            # the listener running at checkpoint time answers, with the fork's own state
            assert http_get(f.connect_port(8000, timeout=10)).endswith(f"fork {i}\n".encode())
        for f in forks:
            # both stale connections were reset at the restore: their programs ended
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                alive = [p for p in (inbound_pid, outbound_pid)
                         if f.exec(f"kill -0 {p}").exit_code == 0
                         and "Z" not in f.exec(f"cat /proc/{p}/stat").stdout.split()[2:3]]
                if not alive:
                    break
                time.sleep(0.5)
            assert not alive, (f"connections of the checkpoint still open in {f.id}: {alive} "
                               f"(in {inbound_pid}, out {outbound_pid}): "
                               f"{f.exec('netstat -tnp; ps').stdout}")
            assert fetch(f, f"http://{PUBLIC}/") == f"hello from {PUBLIC}\n"
        # the source's connections are untouched
        assert sb.exec(f"kill -0 {inbound_pid}").exit_code == 0
        held.sendall(b"still here\n")
    finally:
        held.close()
        sb.exec(f"kill {inbound_pid} {outbound_pid}")
        for f in forks:
            f.destroy()


def test_checkpoint_without_a_card_forks_as_none(worker, sb_none):
    cp = sb_none.checkpoint(name="none")
    assert cp.manifest.network is None
    assert cp.manifest.vm.devices == "forkyard-v1"
    f = worker.fork(cp, network=NetworkSpec())  # a fork keeps the machine: no card
    try:
        assert f.network is None
        assert "eth0" not in f.exec("ip link").stdout
    finally:
        f.destroy()


def _spare_ready(worker) -> str:
    deadline = time.monotonic() + 30
    while not worker.net._spares:
        assert time.monotonic() < deadline, "the plane built no spare namespace"
        time.sleep(0.05)
    return worker.net._spares[-1].netns


def test_a_fork_given_a_spare_namespace_gets_its_own_rules_in_force(worker, sb):
    # a spare is built with the default rules, before anyone asked for it: the
    # fork that takes it must run under the rules *it* was given, names included
    cp = sb.checkpoint(name="spare")
    spare = _spare_ready(worker)
    spec = NetworkSpec(allow_out=("10.213.0.0/16",), deny_out=(f"{PUBLIC}/32", NAME))
    with forked(worker, cp, network=spec) as f:
        assert f._net.netns == spare
        assert fetch(f, f"http://{PRIVATE}/") == f"hello from {PRIVATE}\n"
        assert fetch(f, f"http://{PUBLIC}/") == ""
        assert PUBLIC not in f.exec(f"nslookup {NAME}", timeout=30).stdout
        # the next spare is another namespace, and a fork on defaults is back to them
        with forked(worker, cp) as g:
            assert g._net.netns != spare
            assert fetch(g, f"http://{PUBLIC}/") == f"hello from {PUBLIC}\n"
            assert fetch(g, f"http://{PRIVATE}/") == ""


def test_a_restore_sets_back_what_the_guest_changed_of_its_interface(worker, sb):
    # the agent sets only what differs from the sandbox network's configuration
    # (after a restore, usually nothing): what root in the guest changed is found
    with forked(worker, sb.checkpoint(name="reconf")) as f:
        r = f.exec("ifconfig eth0 10.0.2.99 netmask 255.255.255.128; route del default; "
                   "echo nameserver 192.0.2.53 > /etc/resolv.conf; ip -4 addr show eth0")
        assert "10.0.2.99/25" in r.stdout, r.stdout + r.stderr
        assert fetch(f, f"http://{PUBLIC}/") == ""
        with forked(worker, f.checkpoint(name="reconf-2")) as g:
            shown = g.exec("ip -4 addr show eth0; ip route").stdout
            assert "10.0.2.15/24" in shown and "default via 10.0.2.2" in shown, shown
            assert fetch(g, f"http://{PUBLIC}/") == f"hello from {PUBLIC}\n"
            # the guest's own resolver file is its own: a restore leaves it alone
            assert g.exec("cat /etc/resolv.conf").stdout == "nameserver 192.0.2.53\n"


def test_destroy_removes_the_namespace(worker, sb):
    f = worker.fork(sb.checkpoint(name="gone"))
    netns = f._net.netns
    assert netns in ip.netns_names()
    f.destroy()
    assert netns not in ip.netns_names()


def test_hibernate_and_wake_keep_the_network_and_the_listener(worker, sb):
    spec = NetworkSpec(allow_out=("10.213.0.0/16",))
    f = worker.fork(sb.checkpoint(name="to-hibernate"), network=spec)
    try:
        assert f.network == spec
        f.files.write("/tmp/www/index.html", "hibernated\n")
        f.hibernate()
        worker.wake(f.id)
        assert f.network == spec
        assert http_get(f.connect_port(8000, timeout=10)).endswith(b"hibernated\n")
        assert fetch(f, f"http://{PRIVATE}/") == f"hello from {PRIVATE}\n"
    finally:
        f.destroy()


@pytest.mark.usefixtures("worker")
def test_a_new_worker_sweeps_what_a_dead_one_left():
    import os

    from forkyard.net import NetPlane

    key = f"/tmp/fy-net-sweep-{os.getpid()}"
    # no spare-building threads: a dead worker's are dead, and the second
    # plane's would build a namespace the assertions below would see
    first = NetPlane(key, spares=0)
    net = first.attach("sb-00000000000000000000", NetworkSpec())
    left = net.netns
    assert left in ip.netns_names()
    # the worker dies: its lock goes, nothing is cleaned up
    os.close(first._lock_fd)
    first._lock_fd = None
    if net.tap_fd is not None:
        os.close(net.tap_fd)
    first.resolver.close()
    second = NetPlane(key, spares=0)
    try:
        assert second.block == first.block
        assert left not in ip.netns_names()
        assert not [n for n in ip.link_names() if n.startswith(second.prefix)]
    finally:
        second.close()
