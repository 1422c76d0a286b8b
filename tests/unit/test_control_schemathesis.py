"""Property-based API test: schemathesis against a live control plane's /openapi.json.

The control plane runs for real (uvicorn, SQLite, every route and check)
over one in-memory fake worker (tests/fixtures/fake_worker.py), so requests
reach every code path short of a VM.  Every operation of /v1 and /health is
fuzzed from the schema (examples, coverage and fuzzing phases: valid and
invalid data, undeclared methods), then the stateful phase follows the
schema's links (create -> exec/files/checkpoint -> fork ...).  Every default
check must pass: documented statuses, bodies and content types matching the
schema, no 5xx, valid data accepted, invalid data rejected, 405 with Allow.
The number of examples is bounded (and generation deterministic) so the run
stays short and a failure reproduces.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
import uvicorn

from forkyard.control.server import create_app
from forkyard.wire.serving import bind
from tests.fixtures.fake_worker import fake_worker

API = "api-" + "s" * 40
WORKER = "wrk-" + "t" * 40
MAX_EXAMPLES = 8


@pytest.fixture(scope="module")
def live_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("st")
    store = f"file://{home / 'store'}"
    # no heartbeats come from the fake worker: it must not be declared dead mid-run
    app = create_app(db_url=f"sqlite:///{home}/control.db", api_token=API,
                     worker_token=WORKER, store_url=store, heartbeat_timeout=3600)
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    with fake_worker("fake1", server_url=url, worker_token=WORKER, store_url=store):
        yield url
    srv.should_exit = True
    thread.join(timeout=30)


def _schemathesis(url: str, *extra: str, report: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("schemathesis")
    assert tool.exists(), "schemathesis is a dev dependency: pip install -e '.[dev]'"
    argv = [str(tool), "run", f"{url}/openapi.json",
            "--header", f"Authorization: Bearer {API}",
            # /internal/* takes the worker token and registers workers: a fuzzed
            # registration is a worker placement then tries to use (the registry's
            # refusals are tested in tests/unit/test_control_api.py)
            # and revoking keys could revoke the key this run uses (the revocation
            # rules are tested in tests/unit/test_control_auth.py)
            "--exclude-path-regex", "^/internal/|^/v1/keys/",
            # deterministic: a failure here is reproducible with the same command line
            "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
            "--workers", "1",
            "--request-timeout", "30", "--no-color",
            "--report", "junit", "--report-junit-path", str(report), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_COLOR": "1"}, cwd=report.parent)


def test_every_operation_conforms_to_the_schema(live_plane: str, tmp_path: Path) -> None:
    """All phases (examples, coverage, fuzzing, stateful links), every default check."""
    proc = _schemathesis(live_plane, report=tmp_path / "junit.xml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    # it really ran: every public operation of the schema, and stateful scenarios over links
    paths = httpx.get(f"{live_plane}/openapi.json",
                      headers={"authorization": f"Bearer {API}"}).json()["paths"]
    public = sum(len(ops) for path, ops in paths.items()
                 if not path.startswith(("/internal/", "/v1/keys/")))
    tested = re.search(r"Tested:\s+(\d+)", out)
    assert tested is not None and int(tested.group(1)) == public, out[-5000:]
    links = re.search(r"API Links:\s+(\d+) covered", out)
    assert links is not None and int(links.group(1)) > 0, out[-5000:]
    suites = ElementTree.parse(tmp_path / "junit.xml").getroot()
    failures = sum(int(x.get("failures", 0)) + int(x.get("errors", 0))
                   for x in suites.iter("testsuite"))
    assert failures == 0
