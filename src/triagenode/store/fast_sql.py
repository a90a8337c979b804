"""Hot statements compiled once and run straight on the DBAPI cursor.

The receiver's database writer runs two statements per instance. Through SQLAlchemy's
``Connection.execute`` each costs a few hundred microseconds of Python (execution context,
result wrapping), which holds the GIL that the receiving threads need; run on the driver's
cursor with the same SQL, parameters and type processing they cost a tenth of that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["FastStatement", "on_driver"]


class FastStatement:
    """One Core statement, compiled for ``dialect`` once.

    Parameters
    ----------
    statement
        A Core statement whose parameters are all named bind parameters.
    dialect
        The dialect of the connections it will run on.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        # qmark/numeric paramstyles (SQLite) bind by position, pyformat (psycopg) by name.
        self._names: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positiontup is not None else None
        )
        # Literal values the statement binds itself (e.g. a state name in a WHERE).
        self._defaults: dict[str, Any] = {
            name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required
        }
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            # dialect_impl: the dialect's own processing (SQLite stores datetimes as text
            # in SQLAlchemy's format), exactly what Connection.execute would apply.
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def execute(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        """Run on ``conn``'s DBAPI connection, inside its current transaction.

        Returns the DBAPI cursor (``fetchone()``, ``rowcount``).

        Raises
        ------
        sqlalchemy.exc.DBAPIError
            The driver's error wrapped as SQLAlchemy would (``IntegrityError`` and so on),
            so callers handle both paths alike.
        """
        params = {**self._defaults, **values}
        for name, processor in self._processors.items():
            if name in params:
                params[name] = processor(params[name])
        bound = tuple(params[name] for name in self._names) if self._names is not None else params
        return on_driver(conn, self.sql, bound)


def on_driver(conn: Connection, sql: str, params: Any = ()) -> Any:
    """Run ``sql`` on ``conn``'s DBAPI cursor, inside its current transaction; return the
    cursor (``fetchone()``, ``rowcount``).

    Raises
    ------
    sqlalchemy.exc.DBAPIError
        The driver's error wrapped as SQLAlchemy would (``IntegrityError`` and so on), so
        callers handle both paths alike.
    """
    dialect = conn.dialect
    dbapi = dialect.loaded_dbapi
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, params)
    except dbapi.Error as exc:
        cursor.close()
        raise DBAPIError.instance(sql, params, exc, dbapi.Error, dialect=dialect) from exc
    return cursor
