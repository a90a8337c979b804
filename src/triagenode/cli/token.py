"""``triagenode token``: API bearer tokens (create shows the token once)."""

from __future__ import annotations

import argparse

from triagenode.cli.common import open_database, print_table, settings_from_args

__all__ = ["register"]


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser("token", parents=[parent], help="admin API tokens")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[parent], help="create a token, shown once")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=["auditor", "operator", "admin"])
    create.add_argument("--expires-days", type=float, default=None)
    create.set_defaults(handler=_create)
    listing = actions.add_parser("list", parents=[parent], help="list tokens (never secrets)")
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", parents=[parent], help="revoke a token")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke)


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from triagenode.api.tokens import TokenStore
    from triagenode.audit import AuditLog

    settings = settings_from_args(args)
    db = open_database(settings)
    return db, TokenStore(db), AuditLog.from_settings(settings, db)


def _create(args: argparse.Namespace) -> int:
    from triagenode.audit import AuditEventId
    from triagenode.audit.events import local_actor

    db, store, audit = _open(args)
    token = store.create(args.name, args.role, args.expires_days)
    audit.record(
        AuditEventId.security_alert,
        event_type="user_security_attributes_changed",
        action="C",
        **local_actor().fields({"token": args.name, "role": args.role, "change": "created"}),
    )
    db.dispose()
    print(token)
    print(f"token {args.name!r} ({args.role}) created; it is shown only this once.")
    return 0


def _list(args: argparse.Namespace) -> int:
    db, store, _audit = _open(args)
    rows = [
        {
            "name": t.name,
            "role": t.role,
            "status": t.status,
            "created": f"{t.created_at:%Y-%m-%d %H:%M}",
            "expires": f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never",
            "last_used": f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never",
        }
        for t in store.list()
    ]
    db.dispose()
    print_table(rows, ["name", "role", "status", "created", "expires", "last_used"])
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from triagenode.audit import AuditEventId
    from triagenode.audit.events import local_actor

    db, store, audit = _open(args)
    revoked = store.revoke(args.name)
    if revoked:
        audit.record(
            AuditEventId.security_alert,
            event_type="user_security_attributes_changed",
            action="U",
            **local_actor().fields({"token": args.name, "change": "revoked"}),
        )
    db.dispose()
    print(f"token {args.name!r} revoked" if revoked else f"no active token {args.name!r}")
    return 0 if revoked else 1
