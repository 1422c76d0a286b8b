"""Exec latency and output streaming: through the control plane vs a direct agent call.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_exec.py [--runs 30] [--mib 32]

Starts a one-worker cluster (``forkyard up``) in a temporary home and one
sandbox on it, and boots a second sandbox with the worker library in this
process (its agent called directly, no HTTP).  Rows:

- ``exec true``: round trip of the buffered exec, SDK -> control plane ->
  worker -> agent, vs ``AgentClient.exec`` on the local sandbox (p50/p99 ms);
- ``live exec true``: the streamed form (spawn + output reads) through the
  control plane;
- ``cat FILE`` streamed through the control plane (``sb.commands.run``, output
  read as it comes) vs ``files get`` of the same file (MiB/s), and the live
  read through the guest agent directly;
- a big file (``--big-mib``, default 256) put and got back in a stream
  through the control plane vs the worker library's chunked calls on the
  local sandbox (MiB/s; memory stays at a few chunks either way).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

FORKYARD = str(Path(sys.executable).with_name("forkyard"))


def _times(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm up (connections, page cache)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _mibps(nbytes: int, fn: Callable[[], int]) -> float:
    t = time.perf_counter()
    got = fn()
    if got != nbytes:
        raise SystemExit(f"transfer returned {got} bytes, expected {nbytes}")
    return nbytes / (1 << 20) / (time.perf_counter() - t)


def _blocks(nbytes: int) -> Iterator[bytes]:
    block = os.urandom(1 << 20)
    for _ in range(nbytes >> 20):
        yield block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--big-mib", type=int, default=256)
    args = ap.parse_args()
    from forkyard.sdk import Sandbox
    from forkyard.worker import Worker

    nbytes = args.mib << 20
    make = f"head -c {nbytes} /dev/urandom > /tmp/big"
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "FORKYARD_HOME": str(home)}
        subprocess.run([FORKYARD, "up", "--workers", "1"], env=env, check=True,
                       capture_output=True)
        os.environ["FORKYARD_HOME"] = str(home)
        w = Worker(Path(tmp) / "local", name="local")
        try:
            local = w.create("minimal")
            with Sandbox.create() as sb:
                sb.exec(make, check=True)
                local.exec(make, check=True)
                cp = _times(lambda: sb.exec(["true"]), args.runs)
                live = _times(lambda: sb.commands.run(["true"]), args.runs)
                direct = _times(lambda: local.exec(["true"]), args.runs)

                def cat_cp() -> int:
                    h = sb.commands.start(["cat", "/tmp/big"], lossless=True)
                    return sum(len(d) for _, d in h)

                def cat_direct() -> int:
                    procs = local.procs
                    pid = procs.spawn(["cat", "/tmp/big"], lossless=True)
                    o = n = 0
                    while True:
                        c = procs.read(pid, o, 0, wait=5)
                        n += len(c.stdout)
                        o = c.out_next
                        if c.exited:
                            return n

                stream_cp = _mibps(nbytes, cat_cp)
                get_cp = _mibps(nbytes, lambda: len(sb.files.read("/tmp/big")))
                stream_direct = _mibps(nbytes, cat_direct)
                big = args.big_mib << 20
                put_cp = _mibps(big, lambda: sb.files.write("/root/bigger", _blocks(big)))
                get_cp_big = _mibps(big, lambda: sum(map(len, sb.files.read_stream(
                    "/root/bigger"))))
                sb.files.remove("/root/bigger")
                put_direct = _mibps(big, lambda: local.files.write_stream("/root/bigger",
                                                                          _blocks(big)))
                get_direct = _mibps(big, lambda: sum(map(len, local.files.read_stream(
                    "/root/bigger"))))
        finally:
            w.close()
            subprocess.run([FORKYARD, "down"], env=env, check=False, capture_output=True)

    t = Table(title=f"exec latency ({args.runs} runs) and streaming ({args.mib} MiB)")
    for col in ("measure", "control plane", "direct agent", "ratio cp/direct"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    for name, xs in (("exec true p50 (ms)", cp), ("live exec true p50 (ms)", live)):
        t.add_row(name, f"{_pct(xs, 0.5):.1f}", f"{_pct(direct, 0.5):.1f}",
                  f"{_pct(xs, 0.5) / _pct(direct, 0.5):.1f}x")
    for name, xs in (("exec true p99 (ms)", cp), ("live exec true p99 (ms)", live)):
        t.add_row(name, f"{_pct(xs, 0.99):.1f}", f"{_pct(direct, 0.99):.1f}",
                  f"{_pct(xs, 0.99) / _pct(direct, 0.99):.1f}x")
    t.add_row("stream `cat` (MiB/s)", f"{stream_cp:.1f}", f"{stream_direct:.1f}",
              f"{stream_cp / stream_direct:.2f}x")
    t.add_row("files get (MiB/s)", f"{get_cp:.1f}", "-", "-")
    t.add_row("stream / files get", f"{stream_cp / get_cp:.2f}x", "-", "-")
    for name, a, b in ((f"files put {args.big_mib} MiB (MiB/s)", put_cp, put_direct),
                       (f"files get {args.big_mib} MiB (MiB/s)", get_cp_big, get_direct)):
        t.add_row(name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x")
    Console().print(t)
    print(f"(exec p50 {statistics.median(cp):.1f} ms through the control plane)")


if __name__ == "__main__":
    main()
