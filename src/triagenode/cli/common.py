"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from triagenode.config.settings import Settings, load_settings
from triagenode.errors import ConfigError
from triagenode.store.db import Database

__all__ = ["open_database", "print_json", "print_table", "settings_from_args"]

DEFAULT_CONFIG = Path("triagenode.toml")


def settings_from_args(args: argparse.Namespace, **overrides: dict[str, Any]) -> Settings:
    """Settings from ``--config`` (or ./triagenode.toml when present) and the environment,
    then ``overrides`` from command-line flags (``model={"source": "demo"}``), which win
    over both: a flag typed now is what the operator means."""
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    settings = load_settings(path)
    for section, values in overrides.items():
        for key, value in values.items():
            try:
                setattr(getattr(settings, section), key, value)
            except ValidationError as exc:
                message = exc.errors()[0]["msg"]
                raise ConfigError(f"{section}.{key}: {message} (got {value!r})") from None
    if overrides:
        try:
            settings.check_consistency()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return settings


def open_database(settings: Settings, *, migrate: bool = True) -> Database:
    """The node's database, its schema brought to the newest revision when asked."""
    from triagenode.store import migrate as migrations

    db = Database(settings.database_url, echo=settings.database.echo)
    if migrate:
        migrations.upgrade(db)
    return db


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
