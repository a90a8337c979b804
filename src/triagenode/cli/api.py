"""``triagenode api``: the admin API alone (without the DICOM node), with uvicorn."""

from __future__ import annotations

import argparse

from triagenode.cli.common import open_database, settings_from_args

__all__ = ["register"]


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "api", parents=[parent], help="serve the admin API alone on api.host:api.port"
    )
    parser.add_argument("--host", help="override api.host")
    parser.add_argument("--port", type=int, help="override api.port")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from triagenode.api.server import build_server
    from triagenode.audit import AuditEventId, AuditLog
    from triagenode.web import create_web_app

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings_from_args(args, **({"api": overrides} if overrides else {}))
    db = open_database(settings)
    audit = AuditLog.from_settings(settings, db)
    app = create_web_app(settings, db, audit)
    forwarder = None
    if settings.audit.syslog.enabled:
        from triagenode.audit.syslog import AuditForwarder

        forwarder = AuditForwarder.from_settings(settings, db, audit)
        forwarder.start()
    audit.record(AuditEventId.application_activity, event_type="start", actor="triagenode-api")
    try:
        build_server(app, settings.api.host, settings.api.port).run()
    finally:
        audit.record(AuditEventId.application_activity, event_type="stop", actor="triagenode-api")
        if forwarder is not None:
            forwarder.stop()
            forwarder.drain()  # the stop event too; anything unsent is sent next start
        db.dispose()
    return 0
