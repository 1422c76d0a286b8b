"""``forkyard demo``: the cluster demo, end to end, on this machine.

1. use the cluster of ``--home``, or start one there (2 workers, stock bases:
   each worker builds its own base, so bases differ between them);
2. create a sandbox on the first worker (with its own network), write marker
   files and a random blob, start a background counter process and a web
   server on guest port 8000;
3. checkpoint it and wait until the checkpoint is published;
4. fork it N times, alternating workers, timing each fork;
5. verify every fork: the markers and blob, the background process still
   running, the web server answering through the control plane's port proxy
   (each fork on its own network, the listener not restarted), and every
   file of the base image's test tree after ``drop_caches`` against the
   checksums recorded when the base was built;
6. hibernate the source on one worker and wake it on the other; verify it;
7. print a table per fork and the archive sizes, stop the cluster it started
   (``--keep`` leaves it up) and exit 1 if anything failed verification.

Expected checksums come from the image catalog in the worker homes (the demo
runs on the machine of its cluster).  With a cluster elsewhere (``--url``)
they are taken from the source sandbox just before the checkpoint instead,
which still proves that every fork reads the same base bytes as its source.
"""

from __future__ import annotations

import contextlib
import secrets
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from forkyard.cli._cluster import start_cluster, stop_cluster
from forkyard.cli._options import HomeOpt, JsonOpt, TokenOpt, UrlOpt, home_dir, interactive
from forkyard.cli._output import console, err_console, human_bytes, print_json, short, table
from forkyard.errors import ForkyardError
from forkyard.sdk._sync import Checkpoint, Sandbox, list_workers
from forkyard.sdk.cluster import load_cluster
from forkyard.sdk.config import ConnectionConfig

__all__ = ["register", "run_demo"]

_MARKERS = 3
_BLOB_MIB = 4
_WEB_PORT = 8000
_COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /root/demo/counter.tmp; "
    "mv /root/demo/counter.tmp /root/demo/counter; sleep 1; done"
)


@dataclass(slots=True)
class Check:
    label: str
    sandbox: str
    worker: str | None
    seconds: float  # time to fork/wake
    verified: bool = False
    files: int = 0
    web: bool = False  # the guest web server answered through the port proxy
    verify_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "sandbox": self.sandbox, "worker": self.worker,
                "seconds": round(self.seconds, 3), "verified": self.verified,
                "files": self.files, "web": self.web,
                "verify_seconds": round(self.verify_seconds, 3), "problems": self.problems}


@dataclass(slots=True)
class Source:
    """What the forks must show: written before the checkpoint."""

    markers: dict[str, str]
    blob_sha: str
    counter_pid: int
    expected_files: dict[str, str]
    checksum_source: str
    page: str  # what the guest web server answers


def _find_checksums(homes: list[Path], base: str) -> dict[str, str]:
    from forkyard.config import Home
    from forkyard.image import ImageCatalog

    for h in homes:
        catalog = ImageCatalog(Home.at(h))
        if catalog.has(base):
            files = catalog.file_checksums(base)
            if files:
                return files
    return {}


def _quietly_kill(sb: Sandbox) -> None:
    with contextlib.suppress(ForkyardError):
        sb.kill()


def _base_stored(store_url: str | None, home: Path, base: str) -> int | None:
    """Compressed bytes of the base image in the cluster's store (None if unknown)."""
    if not store_url or not base:
        return None
    from forkyard.config import Home
    from forkyard.store import blob_key, open_store

    with contextlib.suppress(ForkyardError):
        return open_store(store_url, Home.at(home).settings()).size(blob_key(base))
    return None


def _base_size(homes: list[Path], base: str) -> tuple[int, int] | None:
    """(apparent size, bytes allocated on disk) of the base image blob."""
    from forkyard.config import Home
    from forkyard.image import ImageCatalog

    for h in homes:
        catalog = ImageCatalog(Home.at(h))
        if catalog.has(base):
            st = catalog.get(base).path.stat()
            return st.st_size, st.st_blocks * 512
    return None


def _prepare(sb: Sandbox, homes: list[Path], say: Callable[[str], None]) -> Source:
    say("writing marker files, a random blob, starting a background counter")
    markers = {f"/root/demo/marker-{i}": secrets.token_hex(16) for i in range(_MARKERS)}
    for path, value in markers.items():
        sb.files.write(path, value + "\n")
    sb.exec(f"head -c {_BLOB_MIB << 20} /dev/urandom > /root/demo/blob", check=True)
    blob_sha = sb.exec("sha256sum /root/demo/blob", check=True).stdout.split()[0]
    counter = sb.exec(["sh", "-c", _COUNTER], background=True, timeout=None)
    page = secrets.token_hex(16)
    sb.files.write("/root/demo/www/index.html", page + "\n")
    # busybox httpd forks into the background once it listens
    sb.exec(f"httpd -p {_WEB_PORT} -h /root/demo/www", check=True)
    if sb.info.image is None:
        raise ForkyardError(f"sandbox {sb.id} has no base image digest")
    expected = _find_checksums(homes, sb.info.image)
    origin = "image catalog"
    if not expected:
        from forkyard.image import TEST_TREE

        say("no local image catalog: hashing the test tree in the source sandbox")
        out = sb.exec(f"find {TEST_TREE} -type f -print0 | xargs -0 sha256sum", check=True,
                      timeout=600).stdout
        expected = {p: d for d, _, p in (line.partition("  ") for line in out.splitlines())}
        origin = "source sandbox"
    return Source(markers, blob_sha, counter.pid, expected, origin, page)


def _fetch(url: str, verify: ssl.SSLContext | bool) -> str:
    try:
        r = httpx.get(url, timeout=30, verify=verify)
    except httpx.HTTPError as exc:
        return f"nothing ({type(exc).__name__}: {exc})"
    return r.text.strip() if r.status_code == 200 else f"HTTP {r.status_code}"


def _verify(sb: Sandbox, src: Source, check: Check, verify: ssl.SSLContext | bool) -> Check:
    from forkyard.verify import verify_files

    t0 = time.monotonic()
    try:
        for path, value in src.markers.items():
            got = sb.files.read_text(path).strip()
            if got != value:
                check.problems.append(f"{path}: {got!r} != {value!r}")
        blob = sb.exec("sha256sum /root/demo/blob").stdout.split()
        if not blob or blob[0] != src.blob_sha:
            check.problems.append("blob checksum differs")
        if sb.exec(f"kill -0 {src.counter_pid}").exit_code != 0:
            check.problems.append(f"background process {src.counter_pid} is gone")
        page = _fetch(sb.get_url(_WEB_PORT), verify)
        check.web = page == src.page
        if not check.web:
            check.problems.append(f"guest port {_WEB_PORT} answered {page[:60]!r} through "
                                  "the port proxy")
        report = verify_files(sb, src.expected_files)
        check.files = report.checked
        if not report.ok:
            check.problems.append(report.summary())
    except ForkyardError as exc:
        check.problems.append(f"{type(exc).__name__}: {exc}")
    check.verify_seconds = time.monotonic() - t0
    check.verified = not check.problems
    return check


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console(), transient=True,
                   disable=not enabled)
    with bar:
        yield bar


def run_demo(home: Path, *, forks: int, keep: bool, url: str | None, token: str | None,
             show: bool) -> dict[str, Any]:
    """Run the demo; returns its report (``ok`` tells whether every check passed)."""
    note = err_console().print if show else (lambda *_a, **_k: None)

    def say(message: str) -> None:
        note(f"[dim]{message}[/dim]")

    started = False
    if url is None:
        with _progress(show) as bar:
            task = bar.add_task("starting the cluster (2 workers, stock bases)", total=None)
            _cluster, started = start_cluster(
                home, workers=2, stock_bases=True,
                say=lambda m: bar.update(task, description=m))
        say(f"{'started' if started else 'using the running'} cluster in {home}")
    try:
        return _run(home, forks=forks, url=url, token=token, show=show, say=say,
                    started=started)
    finally:
        if started and not keep:
            say("stopping the cluster the demo started (--keep leaves it up)")
            stop_cluster(home)


def _run(home: Path, *, forks: int, url: str | None, token: str | None, show: bool,
         say: Callable[[str], None], started: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {"url": url, "token": token, "home": home}
    verify = ConnectionConfig.resolve(url=url, token=token, home=home).verify()
    cluster = load_cluster(home) if url is None else None
    homes = [Path(w.home) for w in cluster.workers] if cluster else []
    names = sorted(w.name for w in list_workers(**opts) if w.state == "alive")
    if len(names) < 2:
        raise ForkyardError(f"the demo needs 2 live workers, the cluster has {names}")
    checks: list[Check] = []
    with _progress(show) as bar, contextlib.ExitStack() as cleanup:
        task = bar.add_task(f"creating a sandbox on {names[0]}", total=None)
        t0 = time.monotonic()
        src_sb = Sandbox.create(worker=names[0], **opts)
        # whatever fails below, the demo leaves no sandbox behind in a cluster it
        # did not start
        cleanup.callback(_quietly_kill, src_sb)
        boot = time.monotonic() - t0
        src = _prepare(src_sb, homes, lambda m: bar.update(task, description=m))
        bar.update(task, description="checkpointing")
        t0 = time.monotonic()
        cp = src_sb.checkpoint(name="demo")
        cp_seconds = time.monotonic() - t0
        bar.update(task, description="publishing the checkpoint to the store")
        t0 = time.monotonic()
        cp.wait_published()
        publish_seconds = time.monotonic() - t0
        bar.remove_task(task)

        fork_task = bar.add_task("forking", total=forks)
        sandboxes: list[tuple[Sandbox, Check]] = []
        with contextlib.ExitStack() as forks_cleanup:
            for i in range(forks):
                target = names[i % len(names)]
                t0 = time.monotonic()
                fork = Sandbox.fork(cp, worker=target)
                forks_cleanup.callback(_quietly_kill, fork)
                sandboxes.append((fork, Check(f"fork {i + 1}", fork.id, fork.worker,
                                              time.monotonic() - t0)))
                bar.advance(fork_task)
            verify_task = bar.add_task("verifying forks", total=forks)
            # verification is guest-bound (sha256 of the test tree under TCG):
            # run a few at once, as the workers have spare CPUs while one hashes
            with ThreadPoolExecutor(max_workers=4) as pool:
                for done in pool.map(lambda pair: _verify(pair[0], src, pair[1], verify),
                                     sandboxes):
                    checks.append(done)
                    bar.advance(verify_task)

        move_task = bar.add_task(f"hibernating {src_sb.id} on {src_sb.worker}", total=None)
        t0 = time.monotonic()
        src_sb.hibernate()
        hibernate_seconds = time.monotonic() - t0
        other = next(n for n in names if n != src_sb.worker)
        bar.update(move_task, description=f"waking it on {other}")
        t0 = time.monotonic()
        src_sb.wake(worker=other)
        moved = Check(f"woken on {other}", src_sb.id, src_sb.worker, time.monotonic() - t0)
        bar.update(move_task, description="verifying the woken sandbox")
        checks.append(_verify(src_sb, src, moved, verify))
        hib_cp = Checkpoint.get(src_sb.info.last_checkpoint, **opts) \
            if src_sb.info.last_checkpoint else None

    base = _base_size(homes, src_sb.info.image or "")
    report: dict[str, Any] = {
        "ok": all(c.verified for c in checks),
        "home": str(home),
        "cluster_started": started,
        "workers": names,
        "boot_seconds": round(boot, 3),
        "checkpoint": {"id": cp.id, "seconds": round(cp_seconds, 3),
                       "publish_seconds": round(publish_seconds, 3),
                       "changed_bytes": cp.changed_bytes, "stored_bytes": cp.stored_bytes},
        "hibernate": {"seconds": round(hibernate_seconds, 3),
                      "checkpoint": None if hib_cp is None else hib_cp.id,
                      "changed_bytes": None if hib_cp is None else hib_cp.changed_bytes,
                      "stored_bytes": None if hib_cp is None else hib_cp.stored_bytes},
        "base_image": {"digest": src_sb.info.image,
                       "size": None if base is None else base[0],
                       "allocated": None if base is None else base[1],
                       "stored_bytes": _base_stored(cluster.store if cluster else None,
                                                    home, src_sb.info.image or "")},
        "checksums_from": src.checksum_source,
        "checks": [c.to_json() for c in checks],
    }
    return report


def _print_report(report: dict[str, Any]) -> None:
    out = console()
    t = table("", "sandbox", "worker", "fork/wake", "files", f"port {_WEB_PORT}", "verify",
              "verified",
              title="forks of one checkpoint, alternating workers")
    for c in report["checks"]:
        mark = "[green]yes[/green]" if c["verified"] else \
            f"[red]NO[/red] {'; '.join(c['problems'])[:120]}"
        t.add_row(c["label"], c["sandbox"], c["worker"] or "-", f"{c['seconds']:.2f} s",
                  str(c["files"]), "answers" if c["web"] else "-",
                  f"{c['verify_seconds']:.1f} s", mark)
    out.print(t)
    cp, hib, base = report["checkpoint"], report["hibernate"], report["base_image"]
    sizes = table("object", "in the store (zstd)", "uncompressed",
                  title="what a checkpoint costs in the store")
    sizes.add_row(f"checkpoint {short(cp['id'])} (layer + VM state)",
                  human_bytes(cp["stored_bytes"]), human_bytes(cp["changed_bytes"]))
    sizes.add_row(f"hibernation {short(hib['checkpoint'])} (layer + VM state)",
                  human_bytes(hib["stored_bytes"]), human_bytes(hib["changed_bytes"]))
    sizes.add_row(f"base image {short(base['digest'])} (once per store)",
                  human_bytes(base["stored_bytes"]),
                  f"{human_bytes(base['size'])} raw, {human_bytes(base['allocated'])} on disk")
    out.print(sizes)
    out.print(f"boot {report['boot_seconds']:.2f} s, checkpoint {cp['seconds']:.2f} s, "
              f"publish {cp['publish_seconds']:.2f} s, hibernate {hib['seconds']:.2f} s; "
              f"test-tree checksums from the {report['checksums_from']}")
    failed = [c for c in report["checks"] if not c["verified"]]
    if failed:
        out.print(f"[red]{len(failed)} of {len(report['checks'])} sandboxes failed "
                  "verification[/red]")
    else:
        out.print(f"[green]all {len(report['checks'])} sandboxes verified[/green]")


def demo(
    home: HomeOpt = None,
    forks: Annotated[int, typer.Option("--forks", "-n", min=1, max=64)] = 10,
    keep: Annotated[bool, typer.Option("--keep", help="Leave a cluster the demo started "
                                       "running.")] = False,
    url: UrlOpt = None, token: TokenOpt = None, json_: JsonOpt = False,
) -> None:
    """The cluster demo: checkpoint a sandbox, fork it across 2 workers, verify, move it."""
    report = run_demo(home_dir(home), forks=forks, keep=keep, url=url, token=token,
                      show=interactive() and not json_)
    if json_:
        print_json(report)
    else:
        _print_report(report)
        if report["cluster_started"]:
            console().print("the cluster was left running (forkyard down stops it)" if keep
                            else "the cluster the demo started was stopped")
    if not report["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Cluster")(demo)
