"""Rows <-> API objects, and the row updates several parts of the server share."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from forkyard.checkpoint import Manifest
from forkyard.control._db import (
    ArchiveRow,
    CheckpointRow,
    SandboxRow,
    WorkerRow,
    iso,
    parse_time,
    utcnow,
)
from forkyard.wire.errors import ApiError, WorkerReply
from forkyard.wire.models import (
    SANDBOX_ID_RE,
    CheckpointOut,
    CheckpointState,
    SandboxOut,
    SandboxState,
    WorkerCheckpoint,
    WorkerOut,
    WorkerState,
)

__all__ = [
    "ACTIVE",
    "TRANSITIONAL",
    "adopt_published",
    "checkpoint_out",
    "checkpoint_row",
    "describe",
    "mark_lost",
    "sandbox_out",
    "sandbox_row",
    "status_of",
    "store_checkpoint",
    "worker_out",
]

S = SandboxState
# states in which a sandbox occupies (or is about to occupy) a VM on its worker
ACTIVE = (S.STARTING, S.RUNNING, S.WAKING, S.HIBERNATING)
# states another request is in the middle of changing
TRANSITIONAL = (S.STARTING, S.WAKING, S.HIBERNATING)


def describe(exc: BaseException) -> str:
    """One line for a sandbox's ``error`` field."""
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, WorkerReply):
        return str(exc.body.get("error", {}).get("message", exc))
    return f"{type(exc).__name__}: {exc}"


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ApiError | WorkerReply):
        return exc.status
    return 500


# --- API objects --------------------------------------------------------------
def sandbox_out(row: SandboxRow) -> SandboxOut:
    return SandboxOut(
        id=row.id, state=S(row.state), worker=row.worker, image=row.image,
        memory_mb=row.memory_mb, cpus=row.cpus, created=iso(row.created) or "",
        parent_checkpoint=row.parent_checkpoint, last_checkpoint=row.last_checkpoint,
        error=row.error, recoverable_from=row.recoverable_from,
    )


def checkpoint_out(row: CheckpointRow) -> CheckpointOut:
    return CheckpointOut(
        id=row.id, sandbox=row.sandbox, worker=row.worker, name=row.name,
        created=iso(row.created) or "", state=CheckpointState(row.state), base=row.base,
        changed_bytes=row.changed_bytes,
        stored_bytes=row.archive.stored_bytes if row.archive is not None else None,
        error=row.error,
    )


def worker_out(row: WorkerRow) -> WorkerOut:
    return WorkerOut(
        name=row.name, url=row.url, state=WorkerState(row.state),
        last_heartbeat=iso(row.last_heartbeat), running=row.running,
        free_memory_mb=row.free_memory_mb, max_sandboxes=row.max_sandboxes,
        cached_bases=list(row.cached_bases), checkpoints=list(row.checkpoints),
    )


# --- lookups --------------------------------------------------------------------
def sandbox_row(s: Session, sandbox_id: str, *, lock: bool = False) -> SandboxRow:
    if not SANDBOX_ID_RE.match(sandbox_id):
        raise ApiError(404, f"no sandbox {sandbox_id!r}")
    row = s.get(SandboxRow, sandbox_id, with_for_update=lock)
    if row is None:
        raise ApiError(404, f"no sandbox {sandbox_id!r}")
    return row


def checkpoint_row(s: Session, ref: str) -> CheckpointRow:
    """By full id or a unique prefix of at least 6 hex digits (``cp-`` allowed)."""
    ref = ref.strip().lower().removeprefix("cp-")
    if len(ref) < 6 or len(ref) > 64 or any(c not in "0123456789abcdef" for c in ref):
        raise ApiError(404, f"no checkpoint {ref!r} (give its id or a prefix of 6+ hex digits)")
    if len(ref) == 64:
        row = s.get(CheckpointRow, ref)
        if row is None:
            raise ApiError(404, f"no checkpoint {ref!r}")
        return row
    hits = list(s.scalars(select(CheckpointRow).where(CheckpointRow.id.startswith(ref))
                          .limit(2)))
    if not hits:
        raise ApiError(404, f"no checkpoint {ref!r}")
    if len(hits) > 1:
        raise ApiError(404, f"checkpoint prefix {ref!r} is ambiguous; give more digits")
    return hits[0]


# --- shared updates ---------------------------------------------------------------
def adopt_published(s: Session, m: Manifest, store_url: str, *, stored_bytes: int
                    ) -> CheckpointRow:
    """Record a checkpoint found only in the store (no origin worker here)."""
    row = s.get(CheckpointRow, m.id, with_for_update=True)
    if row is not None:
        return row
    created = parse_time(m.created)
    row = CheckpointRow(
        id=m.id, sandbox=m.sandbox, worker=None, name=m.name, created=created,
        state=CheckpointState.PUBLISHED, base=m.base.digest,
        changed_bytes=sum(layer.size for layer in m.layers) + m.state.size, error=None,
    )
    row.archive = ArchiveRow(checkpoint_id=m.id, store_url=store_url,
                             stored_bytes=stored_bytes, published_at=utcnow())
    s.add(row)
    return row


def store_checkpoint(s: Session, cp: WorkerCheckpoint, worker: str,
                     store_url: str) -> CheckpointRow:
    """Record (or update) a checkpoint a worker reported, with its archive if published."""
    row = s.get(CheckpointRow, cp.id, with_for_update=True)
    if row is None:
        row = CheckpointRow(id=cp.id, sandbox=cp.sandbox, worker=worker, name=cp.name,
                            created=parse_time(cp.created), state=cp.state, base=cp.base,
                            changed_bytes=cp.changed_bytes, error=cp.error)
        s.add(row)
    else:
        row.state = cp.state
        row.error = cp.error
    if cp.state == CheckpointState.PUBLISHED and row.archive is None:
        row.archive = ArchiveRow(checkpoint_id=cp.id, store_url=store_url,
                                 stored_bytes=cp.stored_bytes, published_at=utcnow())
    return row


def mark_lost(s: Session, sb: SandboxRow, why: str) -> None:
    sb.state = S.LOST
    sb.error = why
    sb.recoverable_from = _recoverable_from(s, sb)
    sb.updated = utcnow()


def _recoverable_from(s: Session, sb: SandboxRow) -> str | None:
    """The newest published checkpoint of the sandbox, else its published parent.

    A fork that never checkpointed can still be recovered to where it started.
    """
    newest = s.scalars(
        select(CheckpointRow.id)
        .where(CheckpointRow.sandbox == sb.id,
               CheckpointRow.state == CheckpointState.PUBLISHED)
        .order_by(CheckpointRow.created.desc()).limit(1)
    ).first()
    if newest is not None:
        return newest
    if sb.parent_checkpoint is not None:
        parent = s.get(CheckpointRow, sb.parent_checkpoint)
        if parent is not None and parent.state == CheckpointState.PUBLISHED:
            return parent.id
    return None
