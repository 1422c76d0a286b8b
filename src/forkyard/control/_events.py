"""The event log: lifecycle events, and their optional webhook.

Each event is a row (its ``id`` orders them); ``GET /v1/events`` reads them,
a tenant only its own sandboxes' (an event carries its sandbox's tenant; one
without a sandbox, a worker's, only admins see), long-polling with ``wait``
for ``forkyard events --follow``.  The log is capped: past ``MAX_EVENTS`` rows
the oldest are pruned, so an attacker who creates sandboxes all day grows
nothing without bound.

A webhook gets every event as a JSON body signed with HMAC-SHA256 of the
shared secret (``X-Forkyard-Signature: sha256=<hex>``), retried with
exponential backoff; its fate (``delivery``, ``attempts``) is on the event's
row.  The queue of deliveries is bounded: when the receiver is slower than
the cluster, events past the bound are marked ``dropped`` instead of piling up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import delete, func, select

from forkyard.control._db import Database, EventRow, SandboxRow, iso, utcnow
from forkyard.wire.auth import Principal
from forkyard.wire.models import EventKind, EventOut

__all__ = ["MAX_EVENTS", "EventLog", "sign"]

log = logging.getLogger("forkyard.control")

MAX_EVENTS = 10_000
_PRUNE_EVERY = 100
_QUEUE = 1_000
_ATTEMPTS = 5
_SIGNATURE = "X-Forkyard-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event_out(row: EventRow) -> EventOut:
    return EventOut(id=row.id, time=iso(row.time) or "", kind=EventKind(row.kind),
                    sandbox=row.sandbox,
                    checkpoint=row.checkpoint, worker=row.worker, detail=row.detail,
                    delivery=row.delivery, attempts=row.attempts)


class EventLog:
    backoff = 1.0  # seconds before the first retry; doubles each time (tests shorten it)

    def __init__(self, db: Database, *, spawn: Callable[..., None],
                 stopping: threading.Event) -> None:
        self.db = db
        self._spawn = spawn
        self._stopping = stopping
        self._new = threading.Condition()
        self._count = 0
        self._hook: tuple[str, str] | None = None
        self._queue: queue.Queue[int] = queue.Queue(maxsize=_QUEUE)

    def configure_webhook(self, url: str | None, secret: str | None) -> None:
        if url is None:
            self._hook = None
            return
        if not url.startswith(("http://", "https://")) or not secret:
            raise ValueError("a webhook needs an http(s) URL and a non-empty secret")
        self._hook = (url, secret)

    def start(self) -> None:
        if self._hook is not None:
            self._spawn(self._deliver_loop, "webhook")

    # --- writing ----------------------------------------------------------------
    def emit(self, kind: str | EventKind, *, sandbox: str | None = None,
             checkpoint: str | None = None, worker: str | None = None,
             detail: str | None = None) -> None:
        """Record one event; never raises (an event is not worth failing the operation)."""
        try:
            with self.db.tx() as s:
                owner = s.get(SandboxRow, sandbox) if sandbox is not None else None
                row = EventRow(time=utcnow(), kind=EventKind(kind).value, sandbox=sandbox,
                               tenant=owner.tenant if owner is not None else None,
                               checkpoint=checkpoint, worker=worker,
                               detail=detail[:1000] if detail else None,
                               attempts=0, delivery="pending" if self._hook else None)
                s.add(row)
                s.flush()
                event_id = row.id
                self._count += 1
                if self._count % _PRUNE_EVERY == 0:
                    newest = s.scalar(select(func.max(EventRow.id))) or 0
                    s.execute(delete(EventRow).where(EventRow.id <= newest - MAX_EVENTS))
        except Exception:
            log.exception("recording event %s of %s", kind, sandbox)
            return
        with self._new:
            self._new.notify_all()
        if self._hook is not None:
            try:
                self._queue.put_nowait(event_id)
            except queue.Full:
                self._mark(event_id, "dropped", 0)

    # --- reading ------------------------------------------------------------------
    def list(self, caller: Principal, *, sandbox: str | None = None, kind: str | None = None,
             after: int = 0, limit: int = 100, wait: float = 0.0) -> list[EventOut]:
        """The events ``caller`` may see after ``after`` (oldest first); with ``wait``,
        block until one comes."""
        deadline = None
        while True:
            with self.db.tx() as s:
                q = select(EventRow).where(EventRow.id > after).order_by(EventRow.id)
                if not caller.admin:
                    q = q.where(EventRow.tenant == caller.name)
                if sandbox is not None:
                    q = q.where(EventRow.sandbox == sandbox)
                if kind is not None:
                    q = q.where(EventRow.kind == kind)
                rows = [event_out(r) for r in s.scalars(q.limit(limit))]
            if rows or wait <= 0 or self._stopping.is_set():
                return rows
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + wait
            if now >= deadline:
                return rows
            with self._new:
                self._new.wait(min(deadline - now, 0.5))

    # --- the webhook ------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stopping.is_set():
                try:
                    event_id = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    self._deliver(client, event_id)
                except Exception:
                    log.exception("delivering event %d", event_id)

    def _deliver(self, client: httpx.Client, event_id: int) -> None:
        assert self._hook is not None
        url, secret = self._hook
        with self.db.tx() as s:
            row = s.get(EventRow, event_id)
            if row is None:
                return  # pruned meanwhile
            body = json.dumps(event_out(row).model_dump(
                mode="json", exclude={"delivery", "attempts"}), sort_keys=True).encode()
        headers = {"content-type": "application/json", _SIGNATURE: sign(secret, body)}
        delay = self.backoff
        for attempt in range(1, _ATTEMPTS + 1):
            error = self._post(client, url, body, headers)
            if error is None:
                self._mark(event_id, "delivered", attempt)
                return
            log.warning("webhook for event %d, attempt %d: %s", event_id, attempt, error)
            self._mark(event_id, "retrying" if attempt < _ATTEMPTS else "failed", attempt)
            if attempt < _ATTEMPTS and self._stopping.wait(delay):
                return
            delay *= 2

    @staticmethod
    def _post(client: httpx.Client, url: str, body: bytes, headers: dict[str, Any]
              ) -> str | None:
        try:
            resp = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if resp.is_success else f"HTTP {resp.status_code}"

    def _mark(self, event_id: int, delivery: str, attempts: int) -> None:
        with self.db.tx() as s:
            row = s.get(EventRow, event_id, with_for_update=True)
            if row is not None:
                row.delivery = delivery
                row.attempts = attempts
