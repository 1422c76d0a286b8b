"""The one sandbox lifecycle: states, the moves between them, and the guard.

Worker, control plane and SDK all speak of a sandbox's state with
:class:`SandboxState`, and on the wire it is that enum's value.  Every change
of state goes through :func:`check_move` (or a :class:`Lifecycle`, which holds
one state and calls it), so an illegal move is a :class:`SandboxStateError`
at the place it is attempted, never a silently inconsistent record.  Methods
that need the sandbox in given states say so with :func:`require`, as
``qemu.qmp``'s ``@require(Runstate.RUNNING)`` does.

Who uses which states (every state can also go to ``destroyed``, which is
terminal; the table below is the authority)::

    starting ──► running ──► paused ──► running        (worker: the instant of a capture)
    starting ──► hibernated                            (control plane: a worker reports
                                                        what became of a start)
    running ──► hibernating ──► hibernated ──► waking ──► running     (control plane)
    running ──► hibernated ──► starting ──► running     (worker: hibernate, then wake)
    running ──► stopped ──► starting;  running ──► starting (restore in place)
    starting/running/paused/hibernating/waking ──► lost (control plane: worker silent)
    lost ──► running | hibernated | failed              (the worker came back)
    most states ──► failed ──► starting                 (restore a broken sandbox)
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from forkyard.errors import SandboxStateError

__all__ = [
    "BUSY",
    "TRANSITIONAL",
    "TRANSITIONS",
    "Lifecycle",
    "SandboxState",
    "check_move",
    "require",
]


class SandboxState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    WAKING = "waking"
    FAILED = "failed"
    LOST = "lost"
    DESTROYED = "destroyed"


S = SandboxState

# Every legal move.  DESTROYED is added to every row but its own below, and a
# state "moving" to itself is always allowed (an idempotent record).
_MOVES: Mapping[SandboxState, frozenset[SandboxState]] = {
    # starting -> hibernated: the control plane learns (after a restart, or from a
    # worker that left) that the worker hibernated a sandbox whose start it never saw end
    S.STARTING: frozenset({S.RUNNING, S.HIBERNATED, S.FAILED, S.LOST}),
    # running -> starting: a restore in place relaunches the VM under the same id
    S.RUNNING: frozenset({S.PAUSED, S.STOPPED, S.HIBERNATING, S.HIBERNATED, S.STARTING,
                          S.FAILED, S.LOST}),
    S.PAUSED: frozenset({S.RUNNING, S.FAILED, S.LOST}),
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
    # a failed hibernate leaves the VM running, or the worker reports it hibernated
    S.HIBERNATING: frozenset({S.HIBERNATED, S.RUNNING, S.FAILED, S.LOST}),
    S.HIBERNATED: frozenset({S.WAKING, S.STARTING, S.FAILED}),
    # a failed wake leaves it hibernated where it was
    S.WAKING: frozenset({S.RUNNING, S.HIBERNATED, S.FAILED, S.LOST}),
    # failed -> starting: restore a broken sandbox from a checkpoint
    S.FAILED: frozenset({S.STARTING}),
    # a lost worker came back and reported the sandbox as it is
    S.LOST: frozenset({S.RUNNING, S.HIBERNATED, S.FAILED}),
    S.DESTROYED: frozenset(),
}

TRANSITIONS: Mapping[SandboxState, frozenset[SandboxState]] = {
    state: targets | ({S.DESTROYED} if state is not S.DESTROYED else frozenset())
    for state, targets in _MOVES.items()
}

# states in which an operation is under way and the record will change by itself
TRANSITIONAL = frozenset({S.STARTING, S.HIBERNATING, S.WAKING})
# states that occupy a VM on a worker
BUSY = frozenset({S.STARTING, S.RUNNING, S.PAUSED})


def check_move(sandbox_id: str, current: SandboxState | str, to: SandboxState | str,
               operation: str | None = None) -> SandboxState:
    """``to`` as a state, or :class:`SandboxStateError` if ``current`` cannot go there."""
    frm, dest = SandboxState(current), SandboxState(to)
    if dest is not frm and dest not in TRANSITIONS[frm]:
        raise SandboxStateError(sandbox_id, frm.value, operation or f"move to {dest.value}")
    return dest


class Lifecycle:
    """One sandbox's state, changed only through :meth:`move` (thread-safe)."""

    def __init__(self, sandbox_id: str, state: SandboxState = S.STARTING) -> None:
        self.sandbox_id = sandbox_id
        self._state = state
        self._lock = threading.Lock()

    @property
    def state(self) -> SandboxState:
        return self._state

    def move(self, to: SandboxState, operation: str | None = None) -> SandboxState:
        """Go to ``to``; returns the state left."""
        with self._lock:
            before = self._state
            self._state = check_move(self.sandbox_id, before, to, operation)
            return before

    def move_if(self, allowed: frozenset[SandboxState] | set[SandboxState],
                to: SandboxState) -> bool:
        """Go to ``to`` only from one of ``allowed``; False (no change) otherwise."""
        with self._lock:
            if self._state not in allowed:
                return False
            self._state = check_move(self.sandbox_id, self._state, to)
            return True

    def require(self, operation: str, *states: SandboxState) -> SandboxState:
        """The current state if it is one of ``states``, else SandboxStateError."""
        state = self._state
        if state not in states:
            raise SandboxStateError(self.sandbox_id, state.value, operation)
        return state


class _HasLifecycle(Protocol):
    @property
    def lifecycle(self) -> Lifecycle: ...


P = ParamSpec("P")
R = TypeVar("R")
H = TypeVar("H", bound=_HasLifecycle)


def require(*states: SandboxState, operation: str | None = None
            ) -> Callable[[Callable[Concatenate[H, P], R]], Callable[Concatenate[H, P], R]]:
    """Decorate a method of an object with a ``lifecycle``: refuse other states."""

    def decorate(fn: Callable[Concatenate[H, P], R]) -> Callable[Concatenate[H, P], R]:
        op = operation or fn.__name__.strip("_")

        @functools.wraps(fn)
        def wrapper(self: H, /, *args: P.args, **kwargs: P.kwargs) -> R:
            self.lifecycle.require(op, *states)
            return fn(self, *args, **kwargs)

        return wrapper

    return decorate
