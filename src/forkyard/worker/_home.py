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

from forkyard.config import Home
from forkyard.errors import SetupError
from forkyard.wire.lifecycle import SandboxState
from forkyard.worker._record import RECORD_NAME, read_record

__all__ = ["hibernated_records", "keep_logs", "lock_home"]

_KEEP_FAILED = 20  # logs of sandboxes that failed to start, kept in <home>/failed/
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
    only a hibernated sandbox (its state is in a checkpoint) can come back.
    """
    for d in sorted(home.sandboxes_dir.iterdir()):
        try:
            info = read_record(d)
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
            continue
        if info.get("state") == SandboxState.HIBERNATED.value and info.get("last_checkpoint"):
            yield d, info
        else:
            shutil.rmtree(d, ignore_errors=True)
