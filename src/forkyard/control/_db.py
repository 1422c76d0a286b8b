"""The control plane's state: SQLAlchemy 2 ORM models and the database handle.

SQLite (the default, one file in the server's home) and PostgreSQL
(``postgresql+psycopg://...``) behave the same for our purposes:

* every transaction is short and never spans a call to a worker;
* state transitions lock the row first (``SELECT ... FOR UPDATE`` on
  PostgreSQL; on SQLite every transaction starts with ``BEGIN IMMEDIATE``, which
  takes the database's write lock up front and so serializes them the same way
  -- a deferred transaction that upgrades to a writer can fail with
  ``SQLITE_BUSY`` at once, without waiting for ``busy_timeout``);
* the schema is made by the alembic migrations in ``migrations/``, never by
  ``create_all``, so an old database is upgraded rather than half-matched.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from forkyard.errors import DatabaseError, DatabaseUnavailable

__all__ = [
    "ApiKeyRow",
    "ArchiveRow",
    "Base",
    "CheckpointRow",
    "Database",
    "DatabaseError",
    "EventRow",
    "PreviewTokenRow",
    "SandboxRow",
    "TombstoneRow",
    "WorkerRow",
    "iso",
    "parse_time",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    """``2026-11-28T23:59:00.123Z``, the format of the worker library."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None,
                             dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime()}


class WorkerRow(Base):
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    registered: Mapped[dt.datetime]
    last_heartbeat: Mapped[dt.datetime | None]
    running: Mapped[int] = mapped_column(Integer, default=0)
    free_memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    max_sandboxes: Mapped[int] = mapped_column(Integer, default=0)
    cached_bases: Mapped[list[str]] = mapped_column(JSON, default=list)
    checkpoints: Mapped[list[str]] = mapped_column(JSON, default=list)
    images: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    # the last WorkerCapacity it reported (admission); NULL: it reports none
    capacity: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    worker: Mapped[str | None] = mapped_column(ForeignKey("workers.name"), index=True)
    image: Mapped[str | None] = mapped_column(String(64))
    image_ref: Mapped[str | None] = mapped_column(String(200))  # what the caller asked for
    memory_mb: Mapped[int | None]
    cpus: Mapped[int | None]
    created: Mapped[dt.datetime]
    updated: Mapped[dt.datetime]
    # checkpoint ids are references in time, not foreign keys: forgetting a
    # checkpoint (DELETE /v1/checkpoints) must not rewrite sandbox history
    parent_checkpoint: Mapped[str | None] = mapped_column(String(64))
    last_checkpoint: Mapped[str | None] = mapped_column(String(64))
    recoverable_from: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict,
                                                   server_default=text("'{}'"))
    # timers are absolute times in the database: a restarted control plane keeps them
    timeout_s: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[dt.datetime | None] = mapped_column(index=True)
    on_timeout: Mapped[str | None] = mapped_column(String(16))
    idle_hibernate_s: Mapped[int | None] = mapped_column(Integer)
    auto_wake: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_activity: Mapped[dt.datetime | None]
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)  # NULL: admins only
    # a wire NetworkSpec as JSON; NULL: made before networks (none)
    network: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    public_ports: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sandbox: Mapped[str] = mapped_column(String(32), index=True)
    # NULL: known only from the store (imported, or published by another cluster)
    worker: Mapped[str | None] = mapped_column(ForeignKey("workers.name"), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    created: Mapped[dt.datetime]
    state: Mapped[str] = mapped_column(String(16), index=True)
    base: Mapped[str] = mapped_column(String(64))
    changed_bytes: Mapped[int] = mapped_column(BigInteger)
    # RAM chunks stored first by this checkpoint / already stored (NULL: not known)
    ram_new_bytes: Mapped[int | None] = mapped_column(BigInteger)
    ram_shared_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict,
                                                   server_default=text("'{}'"))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)  # NULL: admins only

    archive: Mapped[ArchiveRow | None] = relationship(
        back_populates="checkpoint", cascade="all, delete-orphan", passive_deletes=True,
        lazy="selectin",
    )


class ArchiveRow(Base):
    """A published checkpoint: where its archive is and what it cost."""

    __tablename__ = "archives"

    checkpoint_id: Mapped[str] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    store_url: Mapped[str] = mapped_column(Text)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    published_at: Mapped[dt.datetime]

    checkpoint: Mapped[CheckpointRow] = relationship(back_populates="archive")


class EventRow(Base):
    """One lifecycle event; ``delivery`` is its webhook's fate (NULL: no webhook)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime]
    kind: Mapped[str] = mapped_column(String(32), index=True)
    sandbox: Mapped[str | None] = mapped_column(String(32), index=True)
    checkpoint: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    delivery: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)  # its sandbox's


class ApiKeyRow(Base):
    """An API key; its name is its tenant.  Only the key's sha256 is kept."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean)
    created: Mapped[dt.datetime]
    revoked: Mapped[dt.datetime | None]


class TombstoneRow(Base):
    """A deleted checkpoint: never adopted from the store again."""

    __tablename__ = "checkpoint_tombstones"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64))
    deleted: Mapped[dt.datetime]


class PreviewTokenRow(Base):
    """A preview token of one sandbox port; only its sha256 is kept."""

    __tablename__ = "preview_tokens"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    sandbox: Mapped[str] = mapped_column(String(32), index=True)
    port: Mapped[int] = mapped_column(Integer)
    created: Mapped[dt.datetime]


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        assert isinstance(dbapi_conn, sqlite3.Connection)
        # let SQLAlchemy's "begin" event emit BEGIN itself (see module docstring)
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is still crash-safe
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_PG_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                 "keepalives_count": 2}


class Database:
    """Engine + session factory; ``tx()`` is the only way the server touches state."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise DatabaseError(f"bad database URL: {exc}") from exc
        self.url = url
        self.shown = parsed.render_as_string(hide_password=True)  # for messages and logs
        self.dialect = parsed.get_backend_name()
        try:
            if self.dialect == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                self.engine = create_engine(
                    url, connect_args={"check_same_thread": False, "timeout": 30}
                )
                _sqlite_events(self.engine)
            else:
                # keepalives: a session of a dead machine ends within ~10 s, and with
                # it the advisory lock of an active control plane (control._leader)
                self.engine = create_engine(url, pool_pre_ping=True, pool_size=10,
                                            max_overflow=20, connect_args=_PG_KEEPALIVE)
        except (SQLAlchemyError, ImportError) as exc:
            hint = " (PostgreSQL needs: pip install 'forkyard[postgres]')" \
                if isinstance(exc, ImportError) else ""
            raise DatabaseError(f"cannot use database {self.shown}: {exc}{hint}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One short transaction; database failures become DatabaseUnavailable (503)."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"database error: {type(exc).__name__}") from exc

    def migrate(self) -> None:
        """Create or upgrade the schema (alembic ``upgrade head``)."""
        from forkyard.control._migrate import upgrade_head

        try:
            upgrade_head(self.engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot migrate database {self.shown}: {exc}") from exc

    def close(self) -> None:
        self.engine.dispose()
