"""Create from a template vs create --cold vs fork; a template fetched vs already local.

    .venv/bin/python benchmarks/bench_templates.py [--trials 5] [--root DIR]

Worker ``a`` makes the minimal image's template with its first create (not
timed) and publishes it; then, per trial: a create (forks the template), a
``cold`` create (boots), a fork of a checkpoint of a sandbox, all on ``a``; and
on a new worker sharing ``a``'s store (its image built outside the timing) the
first create (the template is fetched from the store) and a second one (local).
Medians, min and max in seconds, and the ratios the issue sets goals for
(create <= 1.3 x fork, <= 0.15 x cold boot).
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

from forkyard.store import open_store
from forkyard.worker import Worker


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    creates: list[float] = []
    colds: list[float] = []
    forks: list[float] = []
    fetched: list[float] = []
    local: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fy-bench-tpl-") as tmp:
        root = args.root or Path(tmp)
        url = f"file://{root}/store"
        with Worker(root / "a", name="a", store=open_store(url)) as a:
            a.create("minimal").destroy()  # leaves the template behind
            a.wait_background()  # ... published
            src = a.create("minimal")
            src.files.write("/root/data", b"x" * 1_000_000)
            cp = src.checkpoint()
            for i in range(args.trials):
                console.log(f"trial {i + 1}/{args.trials}")
                for samples, fn in ((creates, lambda: a.create("minimal")),
                                    (colds, lambda: a.create("minimal", cold=True)),
                                    (forks, lambda: a.fork(cp))):
                    t, sb = timed(fn)
                    samples.append(t)
                    sb.destroy()  # type: ignore[attr-defined]
                with Worker(root / f"b{i}", name=f"b{i}", store=open_store(url)) as b:
                    b.image("minimal")  # a worker that has the image but never booted it
                    for samples in (fetched, local):
                        t, sb = timed(lambda: b.create("minimal"))
                        samples.append(t)
                        sb.destroy()  # type: ignore[attr-defined]
            src.destroy()
    table = Table(title=f"forkyard creates, minimal image, {args.trials} trials (seconds)")
    for col in ("operation", "median", "min", "max"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    rows = [
        ("create (forks the template)", creates),
        ("create --cold (boots)", colds),
        ("fork of a checkpoint", forks),
        ("create, template fetched from the store", fetched),
        ("create, template local (same new worker)", local),
    ]
    for name, xs in rows:
        table.add_row(name, f"{statistics.median(xs):.3f}", f"{min(xs):.3f}", f"{max(xs):.3f}")
    console.print(table)
    med = statistics.median
    ratio = Table(title="ratios (medians)")
    ratio.add_column("ratio")
    ratio.add_column("value", justify="right")
    ratio.add_column("goal", justify="right")
    ratio.add_row("create / fork", f"{med(creates) / med(forks):.2f}", "<= 1.3")
    ratio.add_row("create / create --cold", f"{med(creates) / med(colds):.3f}", "<= 0.15")
    ratio.add_row("fetched / local template create", f"{med(fetched) / med(local):.2f}", "")
    console.print(ratio)


if __name__ == "__main__":
    main()
