"""Boot vs checkpoint vs fork on one worker, minimal image, measured side by side.

    .venv/bin/python benchmarks/bench_fork.py [--trials 5] [--home DIR]

Prints medians (and min/max) and the ratios that matter; absolute seconds on
a shared 2-core TCG machine are noisy, the ratios much less so.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fy-bench-") as tmp:
        home = args.home or Path(tmp) / "home"
        with Worker(home, name="bench") as w:
            w.image("minimal")  # build outside the timings
            boots, cps, pauses, forks, restores = [], [], [], [], []
            for i in range(args.trials):
                console.log(f"trial {i + 1}/{args.trials}")
                t, sb = timed(lambda: w.create("minimal", cold=True))  # a boot, not a template
                boots.append(t)
                sb.files.write("/root/data", b"x" * 1_000_000)  # type: ignore[attr-defined]
                t, cp = timed(sb.checkpoint)  # type: ignore[attr-defined]
                cps.append(t)
                pauses.append(float(cp.manifest.extra["pause_ms"]) / 1000)  # type: ignore[attr-defined]
                t, fork = timed(lambda cp=cp: w.fork(cp))  # type: ignore[misc]
                forks.append(t)
                t, _ = timed(lambda sb=sb, cp=cp: sb.restore(cp))  # type: ignore[misc]
                restores.append(t)
                fork.destroy()  # type: ignore[attr-defined]
                sb.destroy()  # type: ignore[attr-defined]
    table = Table(title=f"forkyard, minimal image, {args.trials} trials (seconds)")
    for col in ("operation", "median", "min", "max"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    rows = [
        ("boot (create → agent ready)", boots),
        ("checkpoint (call)", cps),
        ("  of which VM paused", pauses),
        ("fork (→ agent ready)", forks),
        ("restore in place", restores),
    ]
    for name, xs in rows:
        table.add_row(name, f"{statistics.median(xs):.3f}", f"{min(xs):.3f}", f"{max(xs):.3f}")
    console.print(table)
    ratio = Table(title="ratios (medians)")
    ratio.add_column("ratio")
    ratio.add_column("value", justify="right")
    ratio.add_row("fork / boot", f"{statistics.median(forks) / statistics.median(boots):.3f}")
    ratio.add_row("checkpoint / boot", f"{statistics.median(cps) / statistics.median(boots):.3f}")
    speedup = statistics.median(boots) / statistics.median(forks)
    ratio.add_row("boot / fork (speed-up)", f"{speedup:.1f}x")
    console.print(ratio)


if __name__ == "__main__":
    main()
