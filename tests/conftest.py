"""Shared fixtures: workers that track and kill every VM, and keep logs of failures.

Modelled on Firecracker's test framework: a factory fixture hands out workers
(each with its own home), and at teardown every VM is killed, the test fails if
any QEMU process of its homes survived, and a failed test's QEMU and console
logs are copied to ``test-artifacts/<test name>/``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# the store backends fixture (directory + S3 on a real server), for the store tests
pytest_plugins = ["tests.fixtures.store_backends"]

ARTIFACTS = Path(os.environ.get("FORKYARD_TEST_ARTIFACTS", "test-artifacts"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def qemu_pids(under: Path) -> list[int]:
    """PIDs of QEMU processes whose command line mentions ``under``."""
    needle = str(under).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and needle in cmd:
            out.append(int(entry.name))
    return out


def _wait_gone(under: Path, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = qemu_pids(under)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def _failed(node: pytest.Item) -> bool:
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


def keep_logs(node_name: str, homes: list[Path]) -> None:
    dest = ARTIFACTS / node_name.replace("/", "_").replace("::", "-")
    for home in homes:
        for log in [*home.glob("sandboxes/*/*.log"), *home.glob("failed/*/*.log")]:
            target = dest / home.name / log.parent.name / log.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, target)


@pytest.fixture(scope="session")
def host_cache() -> Path:
    """The machine-wide download/compile cache shared by every test home."""
    from forkyard.host.setup import cache_dir

    return cache_dir()


@pytest.fixture
def worker_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., object]]:
    from forkyard.worker import Worker

    workers: list[Worker] = []

    def make(name: str = "w", **kwargs: object) -> Worker:
        w = Worker(tmp_path / name, name=name, **kwargs)  # type: ignore[arg-type]
        workers.append(w)
        return w

    yield make
    if _failed(request.node):
        keep_logs(request.node.nodeid, [w.home.root for w in workers])
    for w in workers:
        w.close()
    leaked = _wait_gone(tmp_path)
    assert not leaked, f"QEMU processes left behind: {leaked}"


@pytest.fixture(scope="session")
def shared_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One worker for tests that only read from a sandbox they do not break."""
    from forkyard.worker import Worker

    root = tmp_path_factory.mktemp("shared")
    w = Worker(root / "home", name="shared")
    yield w
    w.close()
    leaked = _wait_gone(root)
    assert not leaked, f"QEMU processes left behind: {leaked}"


@pytest.fixture(scope="session")
def shared_sandbox(shared_worker: object) -> object:
    """A booted minimal sandbox; tests may write under /tmp/<their name> only."""
    return shared_worker.create("minimal")  # type: ignore[attr-defined]
