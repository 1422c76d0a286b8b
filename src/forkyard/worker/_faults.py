"""Crash injection for tests: a worker that SIGKILLs itself at a named point.

``FORKYARD_CRASH_FILE`` names a file; when it holds the name of the point a
worker thread reaches, the file is removed and the process kills itself with
SIGKILL -- no cleanup, no ``finally``, exactly like a machine that lost power
(its QEMUs die with it, see ``forkyard.vm._spawn``).  Without the variable
(every real deployment) a point costs one environment lookup.

The points, in the order a hibernate passes them:

``checkpoint-paused``
    the VM is paused for a capture, nothing of the checkpoint is written yet
``checkpoint-saved``
    the VM state is saved to its temp file, not yet hashed or catalogued
``hibernate-recorded``
    the hibernate's checkpoint is catalogued, the VM still runs
``publish-mid``
    the first bytes of a publish are uploaded, its manifest is not
``publish-uploaded``
    every part and the manifest are in the store, not yet marked published here
``hibernate-published``
    the hibernate is complete on the worker, the control plane not yet told
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_FILE_ENV", "POINTS", "crash_point"]

CRASH_FILE_ENV = "FORKYARD_CRASH_FILE"
POINTS = ("checkpoint-paused", "checkpoint-saved", "hibernate-recorded", "publish-mid",
          "publish-uploaded", "hibernate-published")


def crash_point(name: str) -> None:
    """Die here (SIGKILL) if the crash file names this point."""
    path = os.environ.get(CRASH_FILE_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            armed = f.read(64).strip()
    except OSError:
        return
    if armed != name:
        return
    try:
        os.unlink(path)  # one crash per arming: the restarted worker runs on
    except OSError:
        return  # another thread got here first and is killing us
    os.kill(os.getpid(), signal.SIGKILL)
