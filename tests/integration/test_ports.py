"""Guest ports from outside on real VMs: `forkyard url` (auth required), `port-forward`,
WebSockets, and two forks each answering on their own URL.

They go through the worker's guest network (``Sandbox.connect_port``).  The proxy layer
itself is tested without a VM in tests/unit/test_control_ports.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from forkyard.sdk import Sandbox
from tests.fixtures.cli import FORKYARD, fy, readme_example, up_cluster

pytestmark = pytest.mark.vm

# without -f, busybox httpd binds its port before it goes to the background: the exec
# returns once the server listens (with `exec -d` and -f a request could come first)
SERVE = "mkdir -p /srv && echo {text} > /srv/index.html && httpd -p 8000 -h /srv"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("ports-cluster") / "home"
    with up_cluster(root):
        os.environ["FORKYARD_HOME"] = str(root)
        try:
            yield root
        finally:
            os.environ.pop("FORKYARD_HOME", None)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORKYARD_URL", "FORKYARD_API_TOKEN")}
    env["FORKYARD_HOME"] = str(home)
    env["PATH"] = f"{Path(FORKYARD).parent}:{env.get('PATH', '')}"  # as the README's reader has it
    return env


def test_readme_network_example(home: Path) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_example("network")],
                          env=_env(home), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hello") == 2, proc.stdout


def test_url_needs_auth_and_forks_answer_on_their_own_urls(home: Path) -> None:
    with Sandbox.create() as sb:
        sb.exec(SERVE.format(text="parent"), check=True)
        url = sb.get_url(8000)
        assert httpx.get(url, timeout=60).text.strip() == "parent"
        bare = url.split("?")[0]
        assert httpx.get(bare, timeout=60).status_code == 401
        wrong = httpx.get(bare, params={"forkyard_token": "fyp_wrong"}, timeout=60)
        assert wrong.status_code in (401, 403) and wrong.json()["error"]["type"]
        cp = sb.checkpoint(name="serving")
        a, b = Sandbox.fork(cp, count=2)
        try:
            # the listener of checkpoint time answers in each fork, with that fork's state
            a.exec("echo fork-a > /srv/index.html", check=True)
            b.exec("echo fork-b > /srv/index.html", check=True)
            ua, ub = a.get_url(8000), b.get_url(8000)
            assert httpx.get(ua, timeout=60).text.strip() == "fork-a"
            assert httpx.get(ub, timeout=60).text.strip() == "fork-b"
        finally:
            a.kill()
            b.kill()


def test_port_forward_reaches_the_guest(home: Path) -> None:
    sid = fy("create", home=home).stdout.decode().strip()
    try:
        fy("exec", sid, "--", SERVE.format(text="forwarded"), home=home)
        from forkyard.sdk._forward import Forwarder
        from forkyard.sdk.config import ConnectionConfig

        fwd = Forwarder(ConnectionConfig.resolve(home=home), sid, 8000).start()
        try:
            got = httpx.get(f"http://127.0.0.1:{fwd.port}/", timeout=60)
            assert got.text.strip() == "forwarded"
        finally:
            fwd.close()
    finally:
        fy("rm", sid, home=home)
