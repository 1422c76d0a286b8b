"""Guest memory: today's method (format v2, RAM loaded eagerly) vs RAM images (v3), one run.

    .venv/bin/python benchmarks/bench_memory.py [--small 64] [--large 512] [--forks 10]

Two booted guests hold ``--small`` and ``--large`` MiB of random data in a
guest tmpfs (guest RAM = data + 192 MiB).  Each is checkpointed both ways:
v2 (``Sandbox.ram_images = False``: the whole migration stream, loaded by every
fork) and v3 (device state + a chunked RAM image the forks map).  Printed:

- fork latency (same worker, image already on it) large ÷ small, each method;
- host memory of ``--forks`` idle forks of the large guest vs one fork:
  the forks' private memory (smaps_rollup) plus, for v3, the image once;
- bytes checkpoint k+1 adds to the store (compressed, as uploaded) after the
  guest wrote X MiB of random data, vs X, and the bytes a second worker that
  holds checkpoint k fetches from the store for k+1;
- checkpoint pause of each guest, each method.

Absolute seconds on a shared 2-core TCG machine are noisy; the ratios are what
to quote.  Memory is measured with the forks idle for a few seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from forkyard.checkpoint import Checkpoint
from forkyard.worker import Worker
from forkyard.worker._sandbox import Sandbox

MIB = 1024 * 1024


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fill(sb: Sandbox, mib: int) -> None:
    sb.exec(f"mkdir -p /mnt/ram && mount -t tmpfs -o size={mib + 64}m tmpfs /mnt/ram && "
            f"dd if=/dev/urandom of=/mnt/ram/data bs=1M count={mib} 2>/dev/null",
            check=True, timeout=600)


def checkpoint(sb: Sandbox, v3: bool) -> Checkpoint:
    sb.ram_images = v3
    try:
        return sb.checkpoint()
    finally:
        sb.ram_images = True


def fork_latency(w: Worker, cp: Checkpoint, trials: int) -> float:
    times = []
    for _ in range(trials):
        t, fork = timed(lambda: w.fork(cp))
        times.append(t)
        fork.destroy()
    return statistics.median(times)


def private_bytes(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def memory_of(w: Worker, cp: Checkpoint, count: int) -> tuple[int, int]:
    """(host bytes of one idle fork, of ``count`` idle forks), image counted once."""
    image = cp.manifest.ram.stored_bytes if cp.manifest.ram is not None else 0
    forks = [w.fork(cp) for _ in range(count)]
    try:
        time.sleep(5)
        privs = [private_bytes(f.vm.pid) for f in forks if f.vm and f.vm.pid]
        return privs[0] + image, sum(privs) + image
    finally:
        for f in forks:
            f.destroy()


def transferred(b: Worker, cp_k: Checkpoint, cp_next: Checkpoint) -> int:
    """Bytes worker ``b`` (holding ``cp_k``) reads from the store to fork ``cp_next``."""
    b.fetch_checkpoint(cp_k.id)
    sizes: list[int] = []
    real, real_head = b.store.open_read, b.store.read_head

    def counting(key: str) -> Any:
        sizes.append(b.store.size(key))
        return real(key)

    def counting_head(key: str, n: int) -> bytes:  # how RAM chunks are read
        data = real_head(key, n)
        sizes.append(len(data))
        return data

    b.store.open_read = counting  # type: ignore[method-assign]
    b.store.read_head = counting_head  # type: ignore[method-assign]
    try:
        b.fork(cp_next.id).destroy()
    finally:
        b.store.open_read = real  # type: ignore[method-assign]
        b.store.read_head = real_head  # type: ignore[method-assign]
    return sum(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", type=int, default=64, help="MiB of data in the small guest")
    ap.add_argument("--large", type=int, default=512, help="MiB of data in the large guest")
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--change", type=int, default=8, help="MiB written before checkpoint k+1")
    args = ap.parse_args()
    console = Console()
    rows: dict[str, dict[str, str]] = {"v2 (today)": {}, "v3 (RAM image)": {}}
    with tempfile.TemporaryDirectory(prefix="fy-bench-mem-") as tmp:
        store = f"file://{tmp}/store"
        with Worker(Path(tmp) / "a", name="a", store=store) as w, \
                Worker(Path(tmp) / "b", name="b", store=store) as b:
            w.image("minimal")
            lat: dict[tuple[str, int], float] = {}
            pause: dict[tuple[str, int], float] = {}
            cps: dict[tuple[str, int], Checkpoint] = {}
            for mib in (args.small, args.large):
                console.log(f"guest with {mib} MiB of data")
                sb = w.create("minimal", cold=True, memory_mb=mib + 192)
                fill(sb, mib)
                for name, v3 in (("v2 (today)", False), ("v3 (RAM image)", True)):
                    cp = checkpoint(sb, v3)
                    cps[name, mib] = cp
                    pause[name, mib] = float(cp.manifest.extra["pause_ms"])
                    lat[name, mib] = fork_latency(w, cp, args.trials)
                if mib == args.large:
                    console.log("incremental checkpoint")
                    w.publish(cps["v3 (RAM image)", mib])
                    w.publish(cps["v2 (today)", mib])
                    sb.exec(f"dd if=/dev/urandom of=/mnt/ram/change bs=1M count={args.change} "
                            "2>/dev/null", check=True)
                    for name, v3 in (("v2 (today)", False), ("v3 (RAM image)", True)):
                        nxt = checkpoint(sb, v3)
                        # what k+1 adds to the store (compressed), k being there already
                        stored = w.publish(nxt).uploaded_bytes
                        moved = transferred(b, cps[name, mib], nxt)
                        rows[name]["stored k+1"] = (
                            f"{stored / MIB:.1f} MiB = {stored / (args.change * MIB):.1f} × X")
                        rows[name]["fetched k+1"] = (
                            f"{moved / MIB:.1f} MiB = {moved / (args.change * MIB):.1f} × X")
                    for name in rows:
                        console.log(f"{args.forks} idle forks, {name}")
                        one, many = memory_of(w, cps[name, mib], args.forks)
                        rows[name]["memory"] = (
                            f"1: {one / MIB:.0f} MiB, {args.forks}: {many / MIB:.0f} MiB "
                            f"= {many / one:.1f} × one")
                sb.destroy()
            for name in rows:
                small, large = lat[name, args.small], lat[name, args.large]
                rows[name]["fork"] = (f"{small:.2f} s / {large:.2f} s = "
                                      f"{large / small:.2f}")
                rows[name]["pause"] = (f"{pause[name, args.small]:.0f} ms / "
                                       f"{pause[name, args.large]:.0f} ms")
    table = Table(title=f"guest memory: {args.small} vs {args.large} MiB of data, "
                        f"X = {args.change} MiB changed, {args.forks} forks")
    table.add_column("measure")
    for name in rows:
        table.add_column(name, justify="right")
    labels = {
        "fork": f"fork latency {args.small} / {args.large} MiB = ratio",
        "memory": f"host memory, 1 vs {args.forks} idle forks ({args.large} MiB)",
        "stored k+1": "bytes checkpoint k+1 adds to the store",
        "fetched k+1": "bytes fetched for k+1 by a worker holding k",
        "pause": f"checkpoint pause {args.small} / {args.large} MiB",
    }
    for key, label in labels.items():
        table.add_row(label, *(rows[name].get(key, "-") for name in rows))
    console.print(table)


if __name__ == "__main__":
    main()
