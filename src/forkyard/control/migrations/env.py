"""Alembic environment for the control-plane schema.

The server runs ``upgrade head`` itself at start (forkyard.control._migrate),
passing its open connection in ``config.attributes["connection"]``.  For
development, the ini next to this file lets the alembic CLI work too::

    alembic -c src/forkyard/control/migrations/alembic.ini \
        -x url=sqlite:////tmp/x.db revision --autogenerate -m "..."
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from forkyard.control._db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("give the database with -x url=<sqlalchemy url>")
    return url


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
    else:
        engine = create_engine(_url())
        with engine.begin() as conn:
            _run(conn)
        engine.dispose()
