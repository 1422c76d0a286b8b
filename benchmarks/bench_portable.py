"""What a portable checkpoint costs: forkyard vs. thin-only vs. the upstream flatten.

    .venv/bin/python benchmarks/bench_portable.py [--image debian|minimal] [--s3]
                                                  [--write-mb 20] [--trials 9]

One workload, one run, three archive methods side by side:

- **forkyard**: the checkpoint's own parts (disk layer + VM state, zstd) in the
  content-addressed store; the base travels once per store, by digest.
- **thin-only (unsafe)**: a thin qcow2 overlay with a ``savevm`` snapshot,
  tar + zstd — what the upstream platform archived before its fix; it is
  restored on whatever base the other worker has (see the EBADMSG bug).
- **upstream fix**: the same qcow2 after ``qemu-img rebase -b ""``, tar + zstd
  (the published fix: base data copied in; also wrong under a snapshot).

Then fork latency: on the worker that made the checkpoint, on another worker
that already has the base cached, and on a cold worker that has nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import zstandard
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forkyard.checkpoint import Checkpoint
from forkyard.image import DebianSource, MinimalSource, build_image
from forkyard.store import ObjectStore, open_store
from forkyard.tools import qemu_img
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM
from forkyard.worker import Sandbox, Worker

console = Console()
T = TypeVar("T")
WORKLOAD = """
set -e
mkdir -p /root/work && cd /root/work
python3 - <<'PY'
import os
for i in range({files}):
    with open(f"data_{{i:03}}.bin", "wb") as f:
        f.write(os.urandom(1 << 20))
PY
git init -q . && git add . && git -c user.email=b@x -c user.name=bench commit -qm work
sync
"""


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tar_zst(src: Path, dest: Path) -> int:
    """tar + zstd -3 of one file, like the upstream archive step."""
    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
    with open(dest, "wb") as raw, cctx.stream_writer(raw) as zst, \
            tarfile.open(fileobj=zst, mode="w|") as tar:
        tar.add(src, arcname=src.name)
    return dest.stat().st_size


@contextmanager
def store_for(kind: str, root: Path) -> Iterator[tuple[str, ObjectStore]]:
    if kind == "file":
        url = f"file://{root}/store"
        yield url, open_store(url)
        return
    from tests.fixtures.s3server import running_s3_server

    with running_s3_server() as s3:
        url = s3.store_url("bench")
        yield url, open_store(url, s3.settings())


def upstream_qcow2(w: Worker, cp: Checkpoint, work: Path) -> tuple[Path, float]:
    """The checkpoint as the upstream platform keeps it: thin overlay + savevm snapshot."""
    m = cp.manifest
    f = w.materialize(cp)
    base, layers, state, kernel, initrd = f.base, f.layers, f.state, f.kernel, f.initrd
    if len(layers) != 1:
        raise SystemExit("benchmark expects a single-layer checkpoint")
    up = work / "rootfs.qcow2"
    shutil.copyfile(layers[0], up)
    qemu_img.rebase_unsafe(up, base, "raw")  # an ordinary thin overlay on a base path
    # format v3: the state is device state only; the RAM image is mapped as a fork maps it
    ram = None if m.ram is None else w.ram_images.get(m.ram, what="the upstream archive")
    vm = QemuVM("upstream", work / "vm", w.home.run_dir / "bench-up.agent",
                m.vm,  # the shape and device profile the state was saved with
                BootSpec(kernel, initrd, m.boot.cmdline), DiskChain(base, (), up), ram=ram)
    try:
        vm.launch(incoming_state=state, run=False)
        t, out = timed(lambda: vm.hmp("savevm cp-1"))
        if str(out).strip():
            raise SystemExit(f"savevm failed: {out}")
        vm.quit()
    finally:
        vm.kill()  # the VM releases the hold on ``ram`` it was given
    return up, t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", choices=("debian", "minimal"), default="debian")
    ap.add_argument("--s3", action="store_true", help="use a local S3 server instead of a dir")
    ap.add_argument("--write-mb", type=int, default=20, help="data the sandbox writes")
    ap.add_argument("--trials", type=int, default=9)
    args = ap.parse_args()
    files = max(1, args.write_mb // 2)  # half random files, half their git objects

    with tempfile.TemporaryDirectory(prefix="fy-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with store_for("s3" if args.s3 else "file", tmp) as (url, store):
            a = Worker(tmp / "a", name="a", store=store)
            b = Worker(tmp / "b", name="b", store=open_store(url) if not args.s3 else store)
            source = DebianSource(packages=("python3", "git")) if args.image == "debian" \
                else MinimalSource()
            console.log(f"building the {args.image} image (not timed)")
            info = build_image(a.home, source, name="bench")
            console.log(f"base image: {info.size / 1e6:.0f} MB, sha256:{info.digest[:12]}")

            def workload(target: Sandbox) -> None:
                if args.image == "debian":
                    target.exec(WORKLOAD.format(files=files), timeout=600, check=True)
                else:
                    target.files.write("/root/work.bin",
                                       bytes(range(256)) * (args.write_mb * 4096))

            # the same workload in a second sandbox, checkpointed with its page
            # cache kept: what dropping the cache saves, side by side
            kept_sb = a.create("bench", cold=True)  # booted: one layer, as thin-only has
            workload(kept_sb)
            kept_cp = kept_sb.checkpoint(keep_page_cache=True)
            kept_sb.destroy()

            sb = a.create("bench", cold=True)
            workload(sb)
            t_cp, cp = timed(sb.checkpoint)
            t_pub, report = timed(lambda: a.publish(cp))
            kept_report = a.publish(kept_cp)
            # a second checkpoint after more work: steady state, base already stored
            sb.exec("cd /root && dd if=/dev/urandom of=more.bin bs=1M count=2 2>/dev/null")
            t_cp2, cp2_obj = timed(sb.checkpoint)
            t_pub2, _ = timed(lambda: a.publish(cp2_obj))

            console.log("building the thin-only and upstream archives of the same checkpoint")
            work = tmp / "upstream"
            work.mkdir()
            up, t_savevm = upstream_qcow2(a, cp, work)
            thin_bytes = tar_zst(up, work / "thin.tar.zst")
            flat = work / "flat.qcow2"
            shutil.copyfile(up, flat)
            t_rebase, _ = timed(lambda: _rebase_flatten(flat))
            t_zst, flat_bytes = timed(lambda: tar_zst(flat, work / "flat.tar.zst"))
            t_up, _ = timed(lambda: store.put_file("bench/upstream.tar.zst",
                                                   work / "flat.tar.zst"))

            console.log("fork latency")
            same, warm, cold = [], [], []
            b.fetch_checkpoint(cp.id)  # B now has the base (and the parts) cached
            for i in range(args.trials):
                t, f = timed(lambda: a.fork(cp))
                same.append(t)
                f.destroy()
                _forget_parts(b, cp)  # keep the base, drop layer + state
                t, f = timed(lambda: b.fork(cp.id))
                warm.append(t)
                f.destroy()
                # the chunks it fetched are filed in the cache in the background:
                # finished before anything else is timed
                b.ram_images.drain()
                c = Worker(tmp / f"cold{i}", name=f"cold{i}",
                           store=open_store(url) if not args.s3 else store)
                t, f = timed(lambda c=c: c.fork(cp.id))  # type: ignore[misc]
                cold.append(t)
                f.destroy()
                c.close()
                shutil.rmtree(tmp / f"cold{i}", ignore_errors=True)
            sb.destroy()
            a.close()
            b.close()

    mb = 1e6
    sizes = Table(title=f"bytes stored per checkpoint ({args.image} image, sandbox wrote "
                        f"~{args.write_mb} MB, {'S3' if args.s3 else 'dir'} store)")
    for col in ("method", "MB", "× forkyard", "restores correctly"):
        sizes.add_column(col, justify="left" if col == "method" else "right")
    ours = report.stored_bytes
    sizes.add_row("forkyard (layer + state)", f"{ours / mb:.1f}", "1.00",
                  "yes (verified by digest)")
    sizes.add_row("thin-only tar.zst (unsafe)", f"{thin_bytes / mb:.1f}",
                  f"{thin_bytes / ours:.2f}", "only on the same base bytes")
    sizes.add_row("upstream: rebase -b \"\" + tar.zst", f"{flat_bytes / mb:.1f}",
                  f"{flat_bytes / ours:.2f}", "no (zeros under snapshot)")
    kept = kept_report.stored_bytes
    sizes.add_row("forkyard, page cache kept (keep_page_cache=True)", f"{kept / mb:.1f}",
                  f"{kept / ours:.2f}", "yes (verified by digest)")
    sizes.add_row("  base image, once per store (forkyard)",
                  f"{report.shared_bytes / mb:.1f}", "", "")
    console.print(sizes)

    pub = Table(title="time to publish a checkpoint (s)")
    pub.add_column("method")
    pub.add_column("seconds", justify="right")
    pub.add_row("forkyard, first (checkpoint + publish incl. base upload)", f"{t_cp + t_pub:.2f}")
    pub.add_row("forkyard, next (checkpoint + publish)", f"{t_cp2 + t_pub2:.2f}")
    pub.add_row("upstream (savevm + rebase + tar.zst + upload)",
                f"{t_savevm + t_rebase + t_zst + t_up:.2f}")
    console.print(pub)

    forks = Table(title=f"fork latency, {args.trials} trials (s, median)")
    forks.add_column("where")
    forks.add_column("median", justify="right")
    forks.add_column("× same worker", justify="right")
    forks.add_row("same worker (local parts)", f"{median(same):.2f}", "1.00")
    forks.add_row("other worker, base cached", f"{median(warm):.2f}",
                  f"{median(warm) / median(same):.2f}")
    forks.add_row("other worker, cold", f"{median(cold):.2f}", f"{median(cold) / median(same):.2f}")
    console.print(forks)

    goals = Table(title="targets")
    goals.add_column("target")
    goals.add_column("measured", justify="right")
    goals.add_column("met")
    r1 = ours / thin_bytes
    r2 = median(warm) / median(same)
    goals.add_row("forkyard bytes ≤ 1.1 × thin-only", f"{r1:.2f}", "yes" if r1 <= 1.1 else "NO")
    goals.add_row("cross-worker fork (base cached) ≤ 1.5 × same-worker",
                  f"{r2:.2f}", "yes" if r2 <= 1.5 else "NO")
    console.print(goals)


def _rebase_flatten(path: Path) -> None:
    from forkyard._proc import run

    run(["qemu-img", "rebase", "-b", "", path], timeout=1800)


def _forget_parts(w: Worker, cp: Checkpoint) -> None:
    """Back to "has the base only": every part of the checkpoint but base and boot files
    (layers, state or its chunks, RAM chunks of format v3) and its assembled RAM image."""
    m = cp.manifest
    keep = {m.base.digest, m.boot.kernel.digest, m.boot.initrd.digest}
    for _, ref in m.parts():
        p = w.blobs.path_if_present(ref.digest) if ref.digest not in keep else None
        if p is not None:
            p.unlink()
    if m.ram is not None:
        w.ram_images.forget(m.ram)
    if w.checkpoints.has(cp.id):
        w.checkpoints.remove(cp.id)


if __name__ == "__main__":
    main()
