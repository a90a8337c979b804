"""Durable state: database engine and sessions, ORM models, migrations, spool files."""

from triagenode.store.db import Database

__all__ = ["Database"]
