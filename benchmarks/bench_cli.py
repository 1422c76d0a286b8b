"""CLI start time: the ``forkyard`` command of this tree vs the one before the fast path.

    .venv/bin/python benchmarks/bench_cli.py [--runs 15] [--before REV] [--after SRC]

Both run the installed ``forkyard`` console script with ``PYTHONPATH`` set to
a ``src`` tree, one command after the other, so the two columns see the same
machine load: "after" is this checkout's ``src``; "before" is ``src`` of a git
revision (default: the parent of the commit that added the fast path),
exported to a temporary directory.

Rows: ``--version``; ``ls`` against a control plane with no workers (whole
command: start, request, table); ``ls`` and ``exec`` up to the moment their
HTTP request reaches a listening socket (the start-up cost the CLI controls,
before any network wait); ``exec --help`` (the full typer app).  Medians of
``--runs`` runs each, in milliseconds, and the fastest "after" run (on a
machine shared with VMs, the closest to an unloaded one); CPU is user+sys
time of the process, which load inflates far less than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
FORKYARD = str(Path(sys.executable).with_name("forkyard"))
TARGET_MS = 150.0  # issue 12: --version, ls, exec start in at most ~0.15 s


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True,
                          capture_output=True).stdout


def default_before() -> str:
    added = _git("log", "--diff-filter=A", "--format=%H", "--",
                 "src/forkyard/cli/_fast.py").split()
    if not added:
        raise SystemExit("no commit adds src/forkyard/cli/_fast.py; pass --before REV")
    return added[-1].decode() + "^"


def export_src(rev: str, into: Path) -> Path:
    """``src/`` of ``rev`` under ``into`` (no checkout, no stash)."""
    data = _git("archive", "--format=tar", rev, "src")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


Sample = tuple[float, float | None]  # wall seconds, CPU seconds (user+sys) if known


def run(src: Path, args: list[str], env: dict[str, str]) -> Sample:
    t0 = time.perf_counter()
    proc = subprocess.Popen([FORKYARD, *args], env={**env, "PYTHONPATH": str(src)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)  # its own CPU time: far less load-sensitive
    wall = time.perf_counter() - t0
    proc.returncode = 0  # reaped above; keeps Popen from waiting again
    return wall, usage.ru_utime + usage.ru_stime


class FirstRequest:
    """A socket that notes when each connection's request arrives, answers ``[]``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.arrivals: queue.Queue[float] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                self.arrivals.put(time.perf_counter())
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\nConnection: close\r\n\r\n[]")

    def until_request(self, src: Path, args: list[str], env: dict[str, str]) -> Sample:
        t0 = time.perf_counter()
        while not self.arrivals.empty():  # only this run's first request counts
            self.arrivals.get_nowait()
        argv = [args[0], "--url", self.url, "--token", "t", *args[1:]]
        subprocess.run([FORKYARD, *argv],
                       env={**env, "PYTHONPATH": str(src)}, capture_output=True, check=False)
        try:
            return self.arrivals.get(timeout=5) - t0, None
        except queue.Empty:
            raise SystemExit(f"forkyard {' '.join(args)} sent no request") from None


@contextlib.contextmanager
def control_plane(src: Path, home: Path, env: dict[str, str]) -> Iterator[str]:
    """A control plane with no workers; yields its URL."""
    ready = home / "ready"
    proc = subprocess.Popen(
        [FORKYARD, "server", "--home", str(home), "--api-token", "bench",
         "--worker-token", "bench-w", "--ready-file", str(ready)],
        env={**env, "PYTHONPATH": str(src)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the control plane did not start")
            time.sleep(0.05)
        yield str(json.loads(ready.read_text())["url"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wall_ms(samples: list[Sample]) -> float:
    return statistics.median(wall for wall, _ in samples) * 1000


def _cpu_ms(samples: list[Sample]) -> str:
    cpu = [c for _, c in samples if c is not None]
    return f"{statistics.median(cpu) * 1000:.0f}" if len(cpu) == len(samples) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--before", default=None, help="git revision (default: before _fast.py)")
    ap.add_argument("--after", type=Path, default=REPO / "src")
    opts = ap.parse_args()
    console = Console(width=140)  # one line per row, also when piped
    with tempfile.TemporaryDirectory(prefix="fy-bench-cli-") as tmp:
        root = Path(tmp)
        before_rev = opts.before or default_before()
        before = export_src(before_rev, root / "before")
        after = opts.after.resolve()
        env = {k: v for k, v in os.environ.items()
               if k not in ("FORKYARD_URL", "FORKYARD_API_TOKEN", "FORKYARD_DEBUG")}
        env["FORKYARD_HOME"] = str(root / "home")  # no cluster.json: nothing to find
        probe = FirstRequest()
        (root / "cp").mkdir()
        with control_plane(after, root / "cp", env) as url:
            conn = ["--url", url, "--token", "bench"]
            cases: list[tuple[str, Callable[[Path], Sample]]] = [
                ("--version", lambda s: run(s, ["--version"], env)),
                ("ls: whole command, 0-worker control plane",
                 lambda s: run(s, ["ls", *conn], env)),
                ("ls: until its request arrives",
                 lambda s: probe.until_request(s, ["ls"], env)),
                ("exec SB -- true: until its request arrives",
                 lambda s: probe.until_request(s, ["exec", "sb-x", "--", "true"], env)),
                ("exec --help (the typer app)", lambda s: run(s, ["exec", "--help"], env)),
            ]
            for src in (before, after):  # compile the .pyc files outside the timings
                for _, fn in cases:
                    fn(src)
            results: dict[str, tuple[list[Sample], list[Sample]]] = {
                n: ([], []) for n, _ in cases}
            for i in range(opts.runs):
                console.log(f"run {i + 1}/{opts.runs}")
                for name, fn in cases:  # interleaved: both columns see the same load
                    results[name][0].append(fn(before))
                    results[name][1].append(fn(after))
    table = Table(title=f"forkyard CLI start: median of {opts.runs} runs, ms; "
                  f"before = {before_rev}")
    for col in ("command", "before", "after", "before/after", "after, fastest", "CPU before",
                "CPU after", "after ≤ 150 ms"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for name, (b, a) in results.items():
        mb, ma = _wall_ms(b), _wall_ms(a)
        hot = "--help" not in name and "whole" not in name
        fastest = min(wall for wall, _ in a) * 1000
        table.add_row(name, f"{mb:.0f}", f"{ma:.0f}", f"{mb / ma:.1f}×", f"{fastest:.0f}",
                      _cpu_ms(b), _cpu_ms(a),
                      ("yes" if ma <= TARGET_MS else "NO") if hot else "-")
    console.print(table)


if __name__ == "__main__":
    main()
