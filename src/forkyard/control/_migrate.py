"""Bring a database to the newest schema with the alembic migrations shipped here."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

__all__ = ["MIGRATIONS", "alembic_config", "upgrade_head"]

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine | None = None) -> Config:
    """A config without an ini file: the script location is this package's directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        # '%' would be read as interpolation by configparser
        cfg.set_main_option("sqlalchemy.url",
                            engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade_head(engine: Engine) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        # env.py runs the migrations on this connection, inside this transaction
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
