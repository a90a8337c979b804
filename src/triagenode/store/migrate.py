"""Schema migrations (Alembic), run by ``triagenode db upgrade`` and by ``serve``."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from triagenode.store.db import Database

__all__ = ["current_revision", "head_revision", "upgrade"]

log = logging.getLogger(__name__)
_SCRIPTS = Path(__file__).parent / "migrations"
# "triage" in ASCII, then 0100: the other advisory lock keys are in pipeline/cluster.py.
_PG_MIGRATION_LOCK = 0x7472_6961_6765_0100


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> str:
    """Bring the schema to ``revision``; returns the revision now in force."""
    config = _config()
    with db.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Processes of one node starting together (node.roles) migrate one at a time;
            # the others then find the schema current. Held until this transaction ends.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    now = current_revision(db)
    log.info("database schema at revision %s (%s)", now, db.safe_url)
    return now or ""


def revision(db: Database, message: str) -> None:
    """Autogenerate a migration from the models (developer tool)."""
    config = _config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.revision(config, message=message, autogenerate=True)
