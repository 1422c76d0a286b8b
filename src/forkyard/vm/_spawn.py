"""Start QEMU so that it can never outlive the process that owns it.

QEMU runs with the parent-death signal set to SIGKILL: the kernel kills it
when its parent *thread* dies.  So every QEMU is spawned from one dedicated
thread that lives exactly as long as the process; if the worker is
SIGKILLed, its VMs die with it instead of lingering as orphans holding disks
and memory.  An unconfined QEMU gets the signal from ``setpriv --pdeathsig
KILL``; a confined one from the jail launcher (``vm/_jailer.py``), which arms
it again after dropping privileges, because a credential change clears it.

Either way QEMU's environment is ``ENV`` only: nothing of the worker's
(API or worker tokens, store credentials) reaches a process a guest may own.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV", "spawn"]

ENV = {"PATH": "/usr/bin:/bin"}


@dataclass(frozen=True, slots=True)
class _Request:
    argv: list[str]
    pass_fds: tuple[int, ...]
    log: Path
    cwd: Path
    result: Future[subprocess.Popen[bytes]]


_requests: queue.Queue[_Request] = queue.Queue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _serve() -> None:
    while True:
        req = _requests.get()
        try:
            with open(req.log, "ab") as log:
                proc = subprocess.Popen(
                    req.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=req.pass_fds,
                    cwd=req.cwd,
                    env=ENV,
                    start_new_session=True,  # a Ctrl-C to the worker is not for QEMU
                )
            req.result.set_result(proc)
        except BaseException as exc:  # delivered to the caller's thread
            req.result.set_exception(exc)


def spawn(
    argv: Sequence[str], *, pass_fds: Sequence[int] = (), log: Path, cwd: Path,
    jailed: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv``; ``jailed``: it is a jail launcher command (``Jail.command``)."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, name="forkyard-spawner", daemon=True)
            _thread.start()
    fut: Future[subprocess.Popen[bytes]] = Future()
    full = list(argv) if jailed else ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    _requests.put(_Request(full, tuple(pass_fds), log, cwd, fut))
    return fut.result(timeout=60)
