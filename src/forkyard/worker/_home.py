"""What a worker keeps in its home besides sandboxes' own files.

One worker per home (a lock file), post-mortem logs of sandboxes that failed
to start, and the records an earlier worker process left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forkyard._digest import DIGEST_RE
from forkyard.config import Home
from forkyard.errors import SetupError
from forkyard.wire.lifecycle import SandboxState
from forkyard.worker._record import HIBERNATING_MARK, RECORD_NAME, read_record

__all__ = ["hibernated_records", "keep_logs", "lock_home", "sweep_leftovers"]

_KEEP_FAILED = 20  # logs of sandboxes that failed to start, kept in <home>/failed/
_TMP_WORK = ("export-", "import-", "image-build-")
_LOGS = ("qemu.log", "console.log", "qemu.argv.json", RECORD_NAME)


def lock_home(home: Home) -> int:
    """One Worker per home: a second one would treat the first's sandboxes as stale."""
    fd = os.open(home.root / "worker.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SetupError(
            f"{home.root} is in use by another forkyard worker (pid {owner}); "
            "give this one its own home"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def keep_logs(home: Home, sandbox_dir: Path) -> None:
    """Copy a failed sandbox's logs to ``<home>/failed/<id>`` for a post-mortem."""
    failed = home.root / "failed"
    with contextlib.suppress(OSError):
        dest = failed / sandbox_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in _LOGS:
            if (sandbox_dir / name).exists():
                shutil.copyfile(sandbox_dir / name, dest / name)
        # bounded: the newest few post-mortems are what anyone reads
        for old in sorted(failed.iterdir(), key=lambda p: p.stat().st_mtime)[:-_KEEP_FAILED]:
            shutil.rmtree(old, ignore_errors=True)


def hibernated_records(home: Home) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Sandboxes an earlier process left: the hibernated ones' records; the rest is removed.

    Their QEMUs died with that process (pdeathsig), so only files remain, and
    only a hibernated sandbox (its state is in a checkpoint) can come back --
    including one whose hibernate was cut short after its checkpoint was
    catalogued (the ``hibernating`` mark names it): that checkpoint is where
    the hibernate was taking it anyway.
    """
    for d in sorted(home.sandboxes_dir.iterdir()):
        try:
            info = read_record(d)
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
            continue
        cut_short = _hibernating(home, d)
        if cut_short is not None:
            info = {**info, "state": SandboxState.HIBERNATED.value, "last_checkpoint": cut_short}
        if info.get("state") == SandboxState.HIBERNATED.value and info.get("last_checkpoint"):
            yield d, info
        else:
            shutil.rmtree(d, ignore_errors=True)


def _hibernating(home: Home, sandbox_dir: Path) -> str | None:
    """The checkpoint an interrupted hibernate took, if it is catalogued here."""
    try:
        cp = (sandbox_dir / HIBERNATING_MARK).read_text().strip()
    except OSError:
        return None
    if DIGEST_RE.match(cp) and (home.checkpoints_dir / cp / "manifest.json").is_file():
        return cp
    return None


def sweep_leftovers(home: Home) -> int:
    """Remove what interrupted writes of an earlier process left in this home; the count.

    Only this home's own files: one worker holds it (``lock_home``), so no
    write is under way in it when this runs.
    """
    removed = 0
    cache = home.cache_dir
    candidates = [*cache.rglob(".*.part"), *(cache / "blobs" / ".streams").glob("*")]
    if home.tmp_dir.is_dir():  # work dirs of exports, imports and image builds
        candidates += [p for p in home.tmp_dir.iterdir() if p.name.startswith(_TMP_WORK)]
    for p in candidates:
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
    return removed
