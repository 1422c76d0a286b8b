"""Background processes of a local cluster: start detached, find, stop.

A pid read from ``cluster.json`` is only signalled after its start time
(``/proc/<pid>/stat``) matches the one recorded when ``up`` started it, so a
pid the kernel has since given to someone else is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from forkyard.errors import ForkyardError
from forkyard.sdk.cluster import proc_start_time

__all__ = [
    "ClusterError",
    "alive",
    "died",
    "log_tail",
    "python_argv",
    "qemu_pids",
    "spawn",
    "stop_processes",
    "wait_ready_file",
]


class ClusterError(ForkyardError):
    """A cluster process failed to start, or would not stop."""


def spawn(argv: Sequence[str], *, log: Path, env: Mapping[str, str]) -> tuple[int, int]:
    """Start ``argv`` detached (own session, no terminal); returns (pid, start time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONUNBUFFERED"] = "1"  # logs appear as they happen
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            # its own session: a Ctrl-C in the terminal that ran `up` must not
            # reach the cluster, and it outlives that terminal
            start_new_session=True,
            close_fds=True,
        )
    start = proc_start_time(proc.pid)
    if start is None:
        raise ClusterError(f"{argv[0]} exited at once; see {log}")
    return proc.pid, start


def python_argv(*args: str) -> list[str]:
    """``forkyard ARGS`` run by this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-m", "forkyard.cli", *args]


def alive(pid: int, start: int | None) -> bool:
    return start is not None and proc_start_time(pid) == start


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def died(what: str, log: Path) -> ClusterError:
    """Error for a process that exited: the log's last line (for a Python
    traceback, the exception) on the first line, the tail after it."""
    tail = log_tail(log)
    last = tail.splitlines()[-1].strip() if tail else "no output"
    return ClusterError(f"{what} exited during start-up: {last} (log: {log})\n{tail}")


def wait_ready_file(path: Path, *, pid: int, start: int, timeout: float, what: str,
                    log: Path) -> dict[str, object]:
    """Wait for the JSON a service writes once it listens; fail early if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("url"):
                return data
        if not alive(pid, start):
            _reap(pid)
            raise died(what, log)
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} did not start listening within {timeout:g}s; see {log}")
        time.sleep(0.05)


def _reap(pid: int) -> None:
    # Only our own children can be reaped (the demo runs up and down in one
    # process); for anyone else's this is a no-op.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_processes(procs: Mapping[str, tuple[int, int]], *, timeout: float,
                   say: Callable[[str], None]) -> list[str]:
    """SIGTERM each (name → (pid, start)), wait, then SIGKILL its process group.

    Returns the names that had to be killed.  Processes that are already gone,
    or whose pid now belongs to another process, are skipped.
    """
    live = {n: ps for n, ps in procs.items() if alive(*ps)}
    for name, (pid, _start) in live.items():
        say(f"stopping {name} (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for name, (pid, start) in list(live.items()):
            _reap(pid)
            if not alive(pid, start):
                del live[name]
        if live:
            time.sleep(0.1)
    killed = []
    for name, (pid, start) in live.items():
        if alive(pid, start):
            say(f"{name} (pid {pid}) ignored SIGTERM for {timeout:g}s: killing it")
            killed.append(name)
            # the group too: anything it started in its session goes with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for name, (pid, start) in live.items():
        for _ in range(50):
            _reap(pid)
            if not alive(pid, start):
                break
            time.sleep(0.1)
        else:
            raise ClusterError(f"{name} (pid {pid}) survived SIGKILL")
    return killed


def qemu_pids(under: Path) -> list[int]:
    """QEMU processes whose command line mentions ``under`` (their disks live there)."""
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
