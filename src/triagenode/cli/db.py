"""``triagenode db``: schema migrations."""

from __future__ import annotations

import argparse

from triagenode.cli.common import open_database, settings_from_args


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser("db", parents=[parent], help="database schema")
    actions = parser.add_subparsers(dest="action", required=True)
    upgrade = actions.add_parser("upgrade", parents=[parent], help="migrate to the newest schema")
    upgrade.set_defaults(handler=_upgrade)
    current = actions.add_parser("current", parents=[parent], help="show the schema revision")
    current.set_defaults(handler=_current)


def _upgrade(args: argparse.Namespace) -> int:
    from triagenode.store.migrate import upgrade

    settings = settings_from_args(args)
    db = open_database(settings, migrate=False)
    print(f"database {db.safe_url} at revision {upgrade(db)}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from triagenode.store.migrate import current_revision, head_revision

    db = open_database(settings_from_args(args), migrate=False)
    current = current_revision(db)
    print(f"current: {current or '(empty database)'}  head: {head_revision()}")
    return 0 if current == head_revision() else 1
