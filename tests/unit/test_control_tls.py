"""TLS end to end: the control plane serving HTTPS (``serve(tls_cert=, tls_key=)``), the
SDK and a worker's link verifying it against a self-signed certificate this test makes,
and refusing it without that certificate; the control plane calling a worker over TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forkyard.control._workers import WorkerClients
from forkyard.errors import WorkerUnavailable
from forkyard.sdk import _ops
from forkyard.sdk._http import SyncHTTP
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import APIError, ConfigurationError
from forkyard.wire import worker_api
from forkyard.wire.auth import client_verify, worker_credential
from forkyard.wire.errors import WorkerReply
from forkyard.wire.serving import bind
from forkyard.wire.worker_models import WorkerReport
from forkyard.worker.daemon._link import ControlLink
from tests.fixtures.fake_worker import FakeWorker

ADMIN = "adm-" + "t" * 40
SECRET = "sec-" + "u" * 40


def _self_signed(root: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = root / f"{name}.pem", root / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(root, "control")
    ready = root / "ready.json"
    code = (
        "import os\nfrom pathlib import Path\nfrom forkyard.control.server import serve\n"
        f"serve(Path({str(root / 'home')!r}), api_token=os.environ['T_API'], "
        f"worker_token=os.environ['T_SECRET'], store_url={'file://' + str(root / 'st')!r}, "
        f"ready_file=Path({str(ready)!r}), tls_cert=Path({str(cert)!r}), "
        f"tls_key=Path({str(key)!r}))\n"
    )
    env = {**os.environ, "T_API": ADMIN, "T_SECRET": SECRET,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, (root / "server.log").read_text()
            assert time.monotonic() < deadline, "the control plane did not start"
            time.sleep(0.05)
        url = json.loads(ready.read_text())["url"]
        yield url, cert, root
    finally:
        proc.terminate()  # open keep-alive connections of the SDK's pool may delay it
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_the_control_plane_serves_https_and_the_sdk_verifies_it(
        tls_plane: tuple[str, Path, Path]) -> None:
    url, cert, _ = tls_plane
    assert url.startswith("https://127.0.0.1:")
    trusted = SyncHTTP(ConnectionConfig(url, ADMIN, ca=str(cert)))
    assert trusted.call(_ops.list_sandboxes()) == []
    # the system's trust store does not know a self-signed certificate: refused
    with pytest.raises(APIError):
        SyncHTTP(ConnectionConfig(url, ADMIN)).call(_ops.list_sandboxes())
    # plain HTTP is not served at all
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
    with pytest.raises(ConfigurationError):
        ConnectionConfig(url, ADMIN, ca="/nonexistent.pem").verify()


def test_a_workers_link_registers_over_verified_tls(tls_plane: tuple[str, Path, Path]) -> None:
    url, cert, _ = tls_plane

    def report() -> WorkerReport:
        return WorkerReport(name="wtls", url="http://127.0.0.1:9", running=0,
                            free_memory_mb=0, max_sandboxes=0, cached_bases=[],
                            checkpoints=[])

    def link(verify: object) -> ControlLink:
        return ControlLink(name="wtls", token=worker_credential(SECRET, "wtls"),
                           server_url=url, public_url="http://127.0.0.1:9", interval=0.5,
                           ready_file=None, report=report, on_orphans=lambda _ids: None,
                           verify=verify)  # type: ignore[arg-type]

    untrusting = link(True)
    untrusting.start()
    try:
        assert not untrusting.registered.wait(3), "registered despite an unverified cert"
    finally:
        untrusting.stop()
    trusting = link(client_verify(cert))
    trusting.start()
    try:
        assert trusting.registered.wait(30), "did not register over TLS"
    finally:
        trusting.stop()


def test_the_control_plane_calls_a_worker_over_verified_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "worker")
    sock, url = bind("127.0.0.1", 0)
    url = url.replace("http://", "https://")
    srv = uvicorn.Server(uvicorn.Config(FakeWorker("w1").app(), log_level="warning",
                                        lifespan="off", ssl_certfile=str(cert),
                                        ssl_keyfile=str(key)))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        call = worker_api.get_sandbox("sb-" + "0" * 20)
        clients = WorkerClients(lambda n: worker_credential(SECRET, n),
                                verify=client_verify(cert))
        with pytest.raises(WorkerReply) as answered:  # the worker's own answer, over TLS
            clients.get("w1", url).send(call)
        assert answered.value.status == 404
        blind = WorkerClients(lambda n: worker_credential(SECRET, n))
        with pytest.raises(WorkerUnavailable, match="unreachable"):
            blind.get("w1", url).send(call)
        clients.close()
        blind.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
