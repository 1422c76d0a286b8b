"""The event log: lifecycle events, written in the transaction of the change they record."""

from __future__ import annotations

from sqlalchemy.orm import Session

from forkyard.control._db import EventRow, utcnow

__all__ = ["record"]


def record(s: Session, kind: str, *, sandbox: str | None = None,
           checkpoint: str | None = None, worker: str | None = None,
           detail: str | None = None) -> None:
    s.add(EventRow(time=utcnow(), kind=kind, sandbox=sandbox, checkpoint=checkpoint,
                   worker=worker, detail=detail[:1000] if detail else None, attempts=0))
