"""Rows <-> API objects, and the row updates several parts of the server share."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from forkyard._digest import DIGEST_RE, normalize_prefix, resolve_prefix
from forkyard.checkpoint import Checkpoint, Manifest
from forkyard.control._db import (
    ArchiveRow,
    CheckpointRow,
    SandboxRow,
    TombstoneRow,
    WorkerRow,
    iso,
    parse_time,
    utcnow,
)
from forkyard.errors import ForkyardError, SandboxNotFound
from forkyard.wire.auth import Principal
from forkyard.wire.errors import WorkerReply, status_for
from forkyard.wire.lifecycle import check_move
from forkyard.wire.models import (
    SANDBOX_ID_RE,
    CheckpointOut,
    CheckpointState,
    OnTimeout,
    SandboxOut,
    SandboxState,
    WorkerOut,
    WorkerState,
)
from forkyard.wire.network import NetworkSpec
from forkyard.wire.worker_models import WorkerCheckpoint

__all__ = [
    "ACTIVE",
    "SYSTEM",
    "TRANSITIONAL",
    "adopt_published",
    "checkpoint_out",
    "checkpoint_row",
    "describe",
    "mark_lost",
    "move",
    "refresh_recoverable",
    "sandbox_out",
    "sandbox_row",
    "sees",
    "status_of",
    "store_checkpoint",
    "stored_spec",
    "tombstoned",
    "worker_out",
]

S = SandboxState
# states in which a sandbox occupies (or is about to occupy) a VM on its worker
ACTIVE = (S.STARTING, S.RUNNING, S.WAKING, S.HIBERNATING)
# states another request is in the middle of changing
TRANSITIONAL = (S.STARTING, S.WAKING, S.HIBERNATING)


def describe(exc: BaseException) -> str:
    """One line for a sandbox's ``error`` field."""
    if isinstance(exc, WorkerReply):
        return str(exc.body.get("error", {}).get("message", exc))
    if isinstance(exc, ForkyardError) and status_for(exc)[0] != 500:
        return str(exc)  # an expected refusal: its message says it all
    return f"{type(exc).__name__}: {exc}"


def status_of(exc: BaseException) -> int:
    """The HTTP status ``exc`` becomes at the boundary."""
    if isinstance(exc, WorkerReply):
        return exc.status
    if isinstance(exc, ForkyardError):
        return status_for(exc)[0]
    return 500


def move(row: SandboxRow, to: SandboxState, operation: str | None = None) -> None:
    """The one way a sandbox row changes state: through the lifecycle's guard."""
    row.state = check_move(row.id, row.state, to, operation)
    row.updated = utcnow()


# --- API objects --------------------------------------------------------------
def sandbox_out(row: SandboxRow) -> SandboxOut:
    return SandboxOut(
        id=row.id, state=S(row.state), worker=row.worker, image=row.image,
        memory_mb=row.memory_mb, cpus=row.cpus, created=iso(row.created) or "",
        parent_checkpoint=row.parent_checkpoint, last_checkpoint=row.last_checkpoint,
        error=row.error, recoverable_from=row.recoverable_from,
        labels=dict(row.labels or {}), timeout=row.timeout_s, expires_at=iso(row.expires_at),
        on_timeout=OnTimeout(row.on_timeout) if row.timeout_s and row.on_timeout else None,
        idle_hibernate=row.idle_hibernate_s, auto_wake=row.auto_wake,
        network=stored_spec(row.network),
    )


def stored_spec(raw: dict[str, Any] | None) -> NetworkSpec | None:
    """A network spec as the database keeps it (None: a row from before networks)."""
    return NetworkSpec.model_validate(raw) if raw is not None else None


def checkpoint_out(row: CheckpointRow) -> CheckpointOut:
    return CheckpointOut(
        id=row.id, sandbox=row.sandbox, worker=row.worker, name=row.name,
        created=iso(row.created) or "", state=CheckpointState(row.state), base=row.base,
        changed_bytes=row.changed_bytes,
        stored_bytes=row.archive.stored_bytes if row.archive is not None else None,
        ram_new_bytes=row.ram_new_bytes, ram_shared_bytes=row.ram_shared_bytes,
        error=row.error, labels=dict(row.labels or {}),
    )


def worker_out(row: WorkerRow) -> WorkerOut:
    return WorkerOut(
        name=row.name, url=row.url, state=WorkerState(row.state),
        last_heartbeat=iso(row.last_heartbeat), running=row.running,
        free_memory_mb=row.free_memory_mb, max_sandboxes=row.max_sandboxes,
        cached_bases=list(row.cached_bases), checkpoints=list(row.checkpoints),
    )


# the server's own background work sees every tenant's objects
SYSTEM = Principal("system", "admin")


def sees(caller: Principal, tenant: str | None) -> bool:
    """Another tenant's object does not exist for ``caller`` (admins see all)."""
    return caller.admin or (tenant is not None and tenant == caller.name)


# --- lookups --------------------------------------------------------------------
def sandbox_row(s: Session, sandbox_id: str, *, caller: Principal,
                lock: bool = False) -> SandboxRow:
    if not SANDBOX_ID_RE.match(sandbox_id):
        raise SandboxNotFound(sandbox_id)
    row = s.get(SandboxRow, sandbox_id, with_for_update=lock)
    if row is None or not sees(caller, row.tenant):
        raise SandboxNotFound(sandbox_id)
    return row


def checkpoint_row(s: Session, ref: str, *, caller: Principal) -> CheckpointRow:
    """By full id or a unique prefix of at least 6 hex digits (``cp-`` allowed),
    among the checkpoints ``caller`` can see (another tenant's cannot make a
    prefix ambiguous: that would tell it exists)."""
    prefix = normalize_prefix(ref)
    if DIGEST_RE.match(prefix):
        row = s.get(CheckpointRow, prefix)
        rows = {prefix: row} if row is not None and sees(caller, row.tenant) else {}
    else:
        query = select(CheckpointRow).where(CheckpointRow.id.startswith(prefix))
        if not caller.admin:
            query = query.where(CheckpointRow.tenant == caller.name)
        # two rows are enough to know the prefix is ambiguous
        rows = {r.id: r for r in s.scalars(query.limit(2))}
    return rows[resolve_prefix(prefix, rows)]


def tombstoned(s: Session, checkpoint_id: str) -> bool:
    return s.get(TombstoneRow, checkpoint_id) is not None


# --- shared updates ---------------------------------------------------------------
def adopt_published(s: Session, m: Manifest, store_url: str, *, stored_bytes: int,
                    tenant: str | None) -> CheckpointRow | None:
    """Record a checkpoint found only in the store (no origin worker here);
    None if it was deleted here (its objects may stay in the store)."""
    row = s.get(CheckpointRow, m.id, with_for_update=True)
    if row is not None:
        return row
    if tombstoned(s, m.id):
        return None
    created = parse_time(m.created)
    known = Checkpoint.of(m)
    row = CheckpointRow(
        id=m.id, sandbox=m.sandbox, worker=None, name=m.name, created=created,
        state=CheckpointState.PUBLISHED, base=m.base.digest,
        changed_bytes=m.changed_bytes, error=None, tenant=tenant,
        ram_new_bytes=known.ram_new_bytes, ram_shared_bytes=known.ram_shared_bytes,
    )
    row.archive = ArchiveRow(checkpoint_id=m.id, store_url=store_url,
                             stored_bytes=stored_bytes, published_at=utcnow())
    s.add(row)
    return row


def store_checkpoint(s: Session, cp: WorkerCheckpoint, worker: str,
                     store_url: str, *, revive: bool = False) -> CheckpointRow:
    """Record (or update) a checkpoint a worker reported, with its archive if published.

    It belongs to its sandbox's tenant.  A deleted one is not recorded again
    from a report (the row returned is then not in the session) unless
    ``revive``: its tenant took it again.
    """
    row = s.get(CheckpointRow, cp.id, with_for_update=True)
    if row is None:
        sb = s.get(SandboxRow, cp.sandbox) if SANDBOX_ID_RE.match(cp.sandbox) else None
        row = CheckpointRow(id=cp.id, sandbox=cp.sandbox, worker=worker, name=cp.name,
                            created=parse_time(cp.created), state=cp.state, base=cp.base,
                            changed_bytes=cp.changed_bytes, error=cp.error,
                            ram_new_bytes=cp.ram_new_bytes,
                            ram_shared_bytes=cp.ram_shared_bytes,
                            labels=dict(sb.labels or {}) if sb is not None else {},
                            tenant=sb.tenant if sb is not None else None)
        tomb = s.get(TombstoneRow, cp.id)
        if tomb is not None and not revive:
            return row
        if tomb is not None:
            s.delete(tomb)
        s.add(row)
    else:
        row.state = cp.state
        row.error = cp.error
    if cp.state == CheckpointState.PUBLISHED and row.archive is None:
        row.archive = ArchiveRow(checkpoint_id=cp.id, store_url=store_url,
                                 stored_bytes=cp.stored_bytes, published_at=utcnow())
    return row


def mark_lost(s: Session, sb: SandboxRow, why: str) -> None:
    move(sb, S.LOST)
    sb.error = why
    sb.recoverable_from = _recoverable_from(s, sb)


def refresh_recoverable(s: Session, sandbox_id: str) -> None:
    """A lost sandbox's newest published checkpoint may have settled after it was lost."""
    sb = s.get(SandboxRow, sandbox_id, with_for_update=True) \
        if SANDBOX_ID_RE.match(sandbox_id) else None
    if sb is not None and sb.state == S.LOST:
        sb.recoverable_from = _recoverable_from(s, sb)


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
