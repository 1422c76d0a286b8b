"""What the network costs: throughput out of a guest vs the host, and fork latency with
vs without a NIC, side by side in one run.

    .venv/bin/python benchmarks/bench_network.py [--trials 3] [--mib 32]

Needs root (namespaces, nftables).  It builds the test "internet" of the
integration tests (tests/fixtures/internet.py: a namespace with an HTTP
server) and fetches ``--mib`` MiB from it, from the host and from a guest
(busybox wget to /dev/null, through TAP, the sandbox's rules and two NATs).
Forks of a checkpoint with a NIC and of one without alternate, so both see
the same load; the table shows medians and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures

from forkyard.wire.network import NetworkMode, NetworkSpec
from forkyard.worker import Worker
from tests.fixtures import internet as inet_mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_network needs root (network namespaces, nftables)")
    inet_mod.BIG = args.mib << 20
    console = Console()
    t: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fy-bench-") as tmp, \
            inet_mod.internet("b") as net:
        home = args.home or Path(tmp) / "home"
        with Worker(home, name="bench-net", dns_upstream=net.dns) as w:
            with_nic = w.create("minimal")
            without = w.create("minimal", network=NetworkSpec(mode=NetworkMode.NONE))
            cps = {"with NIC": with_nic.checkpoint(), "without NIC": without.checkpoint()}
            url = f"http://{inet_mod.PUBLIC}/big"
            for i in range(args.trials):
                console.log(f"trial {i + 1}/{args.trials}")
                t0 = time.perf_counter()
                got = len(net.fetch_from_host("/big"))
                t.setdefault("host", []).append(time.perf_counter() - t0)
                assert got > inet_mod.BIG, got
                t0 = time.perf_counter()
                r = with_nic.exec(f"wget -q -O /dev/null {url}", timeout=600)
                t.setdefault("guest", []).append(time.perf_counter() - t0)
                assert r.exit_code == 0, r.stderr
                for kind in (("with NIC", "without NIC") if i % 2 == 0
                             else ("without NIC", "with NIC")):
                    t0 = time.perf_counter()
                    f = w.fork(cps[kind])
                    t.setdefault(kind, []).append(time.perf_counter() - t0)
                    f.destroy()
    med = {k: statistics.median(v) for k, v in t.items()}
    mib = args.mib
    table = Table(title=f"network cost, {args.trials} trials (medians)")
    for col in ("measure", "a", "b", "a/b"):
        table.add_column(col)
    table.add_row(f"{mib} MiB from the test internet (MB/s)",
                  f"guest {mib * 1.048576 / med['guest']:.1f}",
                  f"host {mib * 1.048576 / med['host']:.1f}",
                  f"{med['guest'] / med['host']:.2f}× the host's time")
    table.add_row("fork latency (s)", f"NIC {med['with NIC']:.2f}",
                  f"none {med['without NIC']:.2f}",
                  f"{med['with NIC'] / med['without NIC']:.2f}×")
    console.print(table)


if __name__ == "__main__":
    main()
