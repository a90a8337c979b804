"""``triagenode serve``: run the node, or some of its roles (DICOM receiver, classification
workers, exporter, admin API)."""

from __future__ import annotations

import argparse
from typing import Any

from triagenode.cli.common import settings_from_args
from triagenode.config.settings import ALL_ROLES


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[parent],
        help="run the node",
        description="Receive studies over DICOM, classify them and send SRs to the "
        "destinations. Stops cleanly on SIGINT/SIGTERM; restarts resume where it stopped. "
        "With --role, run only some of the node's parts: processes with different roles "
        "share one PostgreSQL database and one spool folder.",
    )
    parser.add_argument(
        "--demo-model",
        action="store_true",
        help="use the built-in demo model (random weights; DEMO, NOT FOR CLINICAL USE)",
    )
    parser.add_argument("--workers", type=int, default=1, help="classification worker threads")
    parser.add_argument("--port", type=int, default=None, help="override scp.port")
    parser.add_argument(
        "--role",
        action="append",
        choices=[*ALL_ROLES, "all"],
        dest="roles",
        help="run this role (repeat for several; default: node.roles, which defaults to all)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from triagenode.node import Node  # the model stack, imported only when it is needed

    overrides: dict[str, Any] = {}
    if args.demo_model:
        overrides["model"] = {"source": "demo"}
    if args.port is not None:
        overrides["scp"] = {"port": args.port}
    if args.roles:
        overrides["node"] = {"roles": args.roles}
    settings = settings_from_args(args, **overrides)
    Node.build(settings, workers=args.workers).run_forever()
    return 0
