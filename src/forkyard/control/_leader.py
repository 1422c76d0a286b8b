"""Which control plane is active: leadership held in the database.

On PostgreSQL several control planes may share one database; exactly one is
*active* -- it holds a session-level advisory lock on a connection of its own
-- and the others *stand by*: they answer ``/health`` (saying so) and 503
``standby`` to everything else, so clients and workers move on to the next
URL they were given.  A standby tries to take the lock every ``interval``
seconds; the database releases it the moment the active one's session ends
(its process died: the kernel closes its socket; its machine died: TCP
keepalives on that connection, a few seconds), so a standby takes over
within about one interval.  Everything the active one knows is in the
database (worker liveness is each worker's last report time there), so the
new one carries on; it gives every worker one heartbeat timeout of grace
and resumes what the old one left open (``ControlPlane.recover``).

An active plane that loses its lock connection steps down at once (it can
no longer be sure it is the only one) and competes again like a standby.

SQLite is one process's database: that process is always active.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from forkyard.control._db import Database
from forkyard.errors import Standby
from forkyard.wire.errors import error_body

__all__ = ["LOCK_KEY", "Leadership", "StandbyGate"]

log = logging.getLogger("forkyard.control")

LOCK_KEY = 0x666F726B79617264 & 0x7FFFFFFFFFFFFFFF  # "forkyard": one lead per database


class Leadership:
    """Holds (or waits for) the database's lead; ``active`` is set while held."""

    def __init__(self, db: Database, *, interval: float, on_gain: Callable[[], None],
                 stopping: threading.Event) -> None:
        self.db = db
        self.interval = interval
        self.active = threading.Event()
        self._on_gain = on_gain
        self._stopping = stopping
        self._conn: Connection | None = None

    @property
    def shared(self) -> bool:
        """Whether other control planes can share this database."""
        return self.db.dialect == "postgresql"

    def start(self, spawn: Callable[..., None]) -> None:
        if not self.shared:
            self._gain()
            return
        if not self._try():  # at once: a lone plane must not wait an interval to serve
            log.info("another control plane is active on %s: standing by", self.db.shown)
        spawn(self._loop, "leadership")

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval):
            if self.active.is_set():
                self._check()
            else:
                self._try()
        self._release()

    def _try(self) -> bool:
        try:
            conn = self._conn or self.db.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT")
            self._conn = conn
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                    {"k": LOCK_KEY}).scalar())
        except SQLAlchemyError as exc:
            log.warning("leadership: %s", type(exc).__name__)
            self._drop()
            return False
        if got:
            self._gain()
        return got

    def _check(self) -> None:
        """Still holding it: the lock lives exactly as long as this session."""
        try:
            assert self._conn is not None
            self._conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, AssertionError) as exc:
            log.error("lost the lock connection (%s): standing by", type(exc).__name__)
            self.active.clear()
            self._drop()

    def _gain(self) -> None:
        log.info("this control plane is active")
        self.active.set()
        try:
            self._on_gain()
        except Exception:
            log.exception("taking over")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back to the pool: its session held the lock
                conn.close()
            except SQLAlchemyError:
                pass

    def _release(self) -> None:
        self.active.clear()
        self._drop()  # the session ends: the lock goes with it


class StandbyGate:
    """ASGI middleware: while this plane stands by, only ``/health`` is served."""

    def __init__(self, app: Any, *, active: threading.Event) -> None:
        self.app = app
        self.active = active

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.active.is_set() \
                or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # "try again later"
            return
        import json

        status, body = error_body(Standby(
            "this control plane stands by (another one is active): try the next URL"))
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})
