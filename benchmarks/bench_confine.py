"""What confinement costs: boot and fork latency, confined vs unconfined, in one run.

    .venv/bin/python benchmarks/bench_confine.py [--trials 5] [--home DIR]

Needs root (confinement does).  Trials alternate confined and unconfined
sandboxes on one worker, so both see the same machine load; the table shows
medians and the confined/unconfined ratio.  ``confine=False`` exists for this
measurement only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from forkyard.worker import Worker


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--forks", type=int, default=3, help="forks timed per trial")
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_confine needs root: unconfined and confined would be the same")
    console = Console()
    times: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fy-bench-") as tmp:
        home = args.home or Path(tmp) / "home"
        with Worker(home, name="bench") as w:
            w.image("minimal")  # built outside the timings
            for i in range(args.trials):
                # alternate the order so neither mode always runs on a warmer machine
                for confine in (True, False) if i % 2 == 0 else (False, True):
                    console.log(f"trial {i + 1}/{args.trials} confine={confine}")
                    w.confine = confine
                    t, sb = timed(lambda: w.create("minimal"))
                    times.setdefault(("boot", confine), []).append(t)
                    cp = sb.checkpoint()  # type: ignore[attr-defined]
                    for _ in range(args.forks):  # forks are short: more samples, less noise
                        t, fork = timed(lambda cp=cp: w.fork(cp))  # type: ignore[misc]
                        times.setdefault(("fork", confine), []).append(t)
                        fork.destroy()  # type: ignore[attr-defined]
                    sb.destroy()  # type: ignore[attr-defined]
    table = Table(title=f"confinement cost, minimal image, {args.trials} trials (median s)")
    for col in ("operation", "unconfined", "confined", "confined / unconfined"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    for op, label in (("boot", "boot (create → agent ready)"), ("fork", "fork (same worker)")):
        plain = statistics.median(times[(op, False)])
        jailed = statistics.median(times[(op, True)])
        table.add_row(label, f"{plain:.3f}", f"{jailed:.3f}", f"{jailed / plain:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
