"""Which databases a test runs on: the ``database_url`` fixture's parameters, marked.

A test that runs on PostgreSQL carries the ``postgres`` marker, so ``-m "not postgres"``
leaves it out where no server runs. Use :data:`DATABASES` (both) or :func:`on_database`
(one) rather than the bare string ``"postgres"``.
"""

from __future__ import annotations

import pytest

__all__ = ["DATABASES", "POSTGRES", "on_database"]

POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
DATABASES = ["sqlite", POSTGRES]


def on_database(name: str) -> pytest.MarkDecorator:
    """Run the test on one database only: ``@on_database("postgres")``."""
    if name not in ("sqlite", "postgres"):
        raise ValueError(f"unknown test database {name!r}; expected 'sqlite' or 'postgres'")
    param = POSTGRES if name == "postgres" else name
    return pytest.mark.parametrize("database_url", [param], indirect=True)
