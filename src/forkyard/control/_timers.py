"""Timeouts, idle hibernation and auto-wake.

Every timer is a time in the database (``expires_at``; ``last_activity`` +
``idle_hibernate_s``), so a restarted control plane keeps them all: its
timer loop only compares those times with the clock.  A timer that fires is
claimed first, in a transaction under the row lock (``expires_at`` cleared,
the event written), so two loops -- or a loop and a ``set_timeout`` racing
it -- never act twice.  Reading a sandbox (``get``, ``connect``) changes
nothing; only exec and file requests count as activity.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

from sqlalchemy import select

from forkyard.control._db import SandboxRow, utcnow
from forkyard.control._hibernation import Hibernation
from forkyard.control._records import SYSTEM, describe, sandbox_out, sandbox_row
from forkyard.control._transitions import refused
from forkyard.control._workers import WorkerClient
from forkyard.errors import SandboxStateError
from forkyard.wire.auth import Principal
from forkyard.wire.models import (
    CreateSandboxRequest,
    OnTimeout,
    SandboxOut,
    SandboxState,
    TimeoutRequest,
    WakeRequest,
)

__all__ = ["Timers", "timer_fields"]

log = logging.getLogger("forkyard.control")

S = SandboxState
_TOUCH_EVERY = 1.0  # seconds: activity is written at most this often per sandbox
_MAX_TOUCHED = 10_000


def timer_fields(req: CreateSandboxRequest, now: dt.datetime) -> dict[str, Any]:
    """The timer columns of a new sandbox row."""
    return {
        "timeout_s": req.timeout,
        "expires_at": now + dt.timedelta(seconds=req.timeout) if req.timeout else None,
        "on_timeout": req.on_timeout.value,
        "idle_hibernate_s": req.idle_hibernate,
        "auto_wake": req.auto_wake,
        "last_activity": now,
    }


class Timers(Hibernation):
    timer_tick = 1.0  # seconds between checks (tests make it shorter)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._touched: dict[str, float] = {}  # sandbox -> monotonic time of its last write
        self._firing: set[str] = set()
        self._timer_lock = threading.Lock()

    # --- the API ---------------------------------------------------------------
    def set_timeout(self, sandbox_id: str, req: TimeoutRequest,
                    caller: Principal) -> SandboxOut:
        """A new timeout from now (or none); the one way to move a running timer."""
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller, lock=True)
            if row.state in (S.DESTROYED, S.FAILED):
                raise refused(sandbox_id, row.state, "set the timeout of")
            row.timeout_s = req.timeout
            row.expires_at = utcnow() + dt.timedelta(seconds=req.timeout) \
                if req.timeout is not None else None
            return sandbox_out(row)

    def serving(self, sandbox_id: str, operation: str, caller: Principal) -> WorkerClient:
        """``running`` for exec and file requests: they count as activity, and wake an
        ``auto_wake`` sandbox that sleeps."""
        try:
            client = self.running(sandbox_id, operation, caller)
        except SandboxStateError:
            if not self._auto_wake(sandbox_id, caller):
                raise
            client = self.running(sandbox_id, operation, caller)
        self._touch(sandbox_id)
        return client

    def _auto_wake(self, sandbox_id: str, caller: Principal) -> bool:
        """Wake the sandbox if it sleeps and asked for that; False: it did not."""
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller)
            state, auto = S(row.state), row.auto_wake
        if not auto or state not in (S.HIBERNATING, S.HIBERNATED):
            return False
        if state == S.HIBERNATING:
            self._wait_settled(sandbox_id, S.HIBERNATING)
        if self.get_sandbox(sandbox_id, caller).state == S.HIBERNATED:
            self.wake(sandbox_id, WakeRequest(), caller)
        return True

    def _touch(self, sandbox_id: str) -> None:
        now = time.monotonic()
        with self._timer_lock:
            if now - self._touched.get(sandbox_id, -_TOUCH_EVERY) < _TOUCH_EVERY:
                return
            if len(self._touched) >= _MAX_TOUCHED:
                self._touched.clear()  # only a rate limit: forgetting costs one write each
            self._touched[sandbox_id] = now
        with self.db.tx() as s:
            row = s.get(SandboxRow, sandbox_id, with_for_update=True)
            if row is not None:
                row.last_activity = utcnow()

    # --- the loop ----------------------------------------------------------------
    def _timer_loop(self) -> None:
        while not self.stopping.wait(self.timer_tick):
            if not self.leader.active.is_set():
                continue  # only the active control plane fires timers
            try:
                self.check_timers()
            except Exception:
                log.exception("checking timers")

    def check_timers(self) -> None:
        """Fire every timer that is due (each in its own thread: a hibernate is slow)."""
        now = utcnow()
        due: list[tuple[str, str]] = []
        with self.db.tx() as s:
            for row in s.scalars(select(SandboxRow).where(
                    SandboxRow.expires_at.is_not(None), SandboxRow.expires_at <= now,
                    SandboxRow.state.in_((S.RUNNING, S.HIBERNATED)))):
                due.append((row.id, "timeout"))
            for row in s.scalars(select(SandboxRow).where(
                    SandboxRow.idle_hibernate_s.is_not(None), SandboxRow.state == S.RUNNING)):
                assert row.idle_hibernate_s is not None
                since = max(row.last_activity or row.updated, row.updated)
                if since + dt.timedelta(seconds=row.idle_hibernate_s) <= now:
                    due.append((row.id, "idle"))
        for sid, why in due:
            with self._timer_lock:
                if sid in self._firing:
                    continue
                self._firing.add(sid)
            self._spawn(self._fire, f"timer-{sid}", sid, why)

    def _fire(self, sandbox_id: str, why: str) -> None:
        try:
            action = self._claim(sandbox_id, why)
            if action == OnTimeout.KILL:
                self.destroy_sandbox(sandbox_id, SYSTEM)
            elif action == OnTimeout.HIBERNATE:
                self.hibernate(sandbox_id, SYSTEM, wait=True)
        except Exception as exc:
            log.warning("%s of %s: %s", why, sandbox_id, describe(exc))
        finally:
            with self._timer_lock:
                self._firing.discard(sandbox_id)

    def _claim(self, sandbox_id: str, why: str) -> OnTimeout | None:
        """Re-check under the row lock that the timer is still due; disarm it."""
        now = utcnow()
        with self.db.tx() as s:
            row = s.get(SandboxRow, sandbox_id, with_for_update=True)
            if row is None:
                return None
            if why == "timeout":
                if row.expires_at is None or row.expires_at > now or \
                        row.state not in (S.RUNNING, S.HIBERNATED):
                    return None
                action = OnTimeout(row.on_timeout or OnTimeout.KILL)
                row.expires_at = None  # one-shot: set_timeout arms it again
                if action == OnTimeout.HIBERNATE and row.state == S.HIBERNATED:
                    return None
                event = ("timed_out", row.worker, f"timeout of {row.timeout_s}s: {action.value}")
            else:
                if row.idle_hibernate_s is None or row.state != S.RUNNING:
                    return None
                since = max(row.last_activity or row.updated, row.updated)
                if since + dt.timedelta(seconds=row.idle_hibernate_s) > now:
                    return None  # traffic since the loop looked
                action = OnTimeout.HIBERNATE
                event = ("idle", row.worker, f"idle for {row.idle_hibernate_s}s: hibernate")
        self.events.emit(event[0], sandbox=sandbox_id, worker=event[1], detail=event[2])
        return action
