"""Stopping cluster processes: SIGTERM first, SIGKILL for the stubborn, never a stranger."""

from __future__ import annotations

import subprocess
import sys
import time

from forkyard.cli._procs import alive, qemu_pids, stop_processes
from forkyard.sdk.cluster import proc_start_time

STUBBORN = ("import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")


def _start(script: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_a_process_ignoring_sigterm_is_killed_after_the_timeout():
    proc = _start(STUBBORN)
    try:
        start = proc_start_time(proc.pid)
        assert start is not None and alive(proc.pid, start)
        said: list[str] = []
        t0 = time.monotonic()
        killed = stop_processes({"w1": (proc.pid, start)}, timeout=0.5, say=said.append)
        assert killed == ["w1"]
        assert time.monotonic() - t0 >= 0.5
        assert not alive(proc.pid, start)
        assert any("ignored SIGTERM" in line for line in said)
    finally:
        proc.kill()
        proc.wait()


def test_a_polite_process_is_not_reported_as_killed():
    proc = _start("print('ready', flush=True)\nimport time\ntime.sleep(60)\n")
    try:
        start = proc_start_time(proc.pid)
        assert start is not None
        assert stop_processes({"server": (proc.pid, start)}, timeout=5, say=lambda m: None) == []
        assert not alive(proc.pid, start)
    finally:
        proc.kill()
        proc.wait()


def test_a_pid_with_another_start_time_is_left_alone():
    proc = _start(STUBBORN)
    try:
        start = proc_start_time(proc.pid)
        assert start is not None
        assert stop_processes({"old": (proc.pid, start - 1)}, timeout=0.2,
                              say=lambda m: None) == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_qemu_pids_only_match_qemu_under_the_path(tmp_path):
    # a non-QEMU process mentioning the path is not a QEMU of that home
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             str(tmp_path)])
    try:
        assert proc.pid not in qemu_pids(tmp_path)
    finally:
        proc.kill()
        proc.wait()
