"""``triagenode serve``: run the node (DICOM receiver, pipeline, exporter, admin API)."""

from __future__ import annotations

import argparse
from typing import Any

from triagenode.cli.common import settings_from_args


def register(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[parent],
        help="run the node",
        description="Receive studies over DICOM, classify them and send SRs to the "
        "destinations. Stops cleanly on SIGINT/SIGTERM; restarts resume where it stopped.",
    )
    parser.add_argument(
        "--demo-model",
        action="store_true",
        help="use the built-in demo model (random weights; DEMO, NOT FOR CLINICAL USE)",
    )
    parser.add_argument("--workers", type=int, default=1, help="classification worker threads")
    parser.add_argument("--port", type=int, default=None, help="override scp.port")
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from triagenode.cli.purge import RetentionPurger
    from triagenode.node import Node

    overrides: dict[str, Any] = {}
    if args.demo_model:
        overrides["model"] = {"source": "demo"}
    if args.port is not None:
        overrides["scp"] = {"port": args.port}
    settings = settings_from_args(args, **overrides)
    node = Node(settings, workers=args.workers)
    purger = RetentionPurger(settings, node.db, node.audit)
    purger.start()
    try:
        node.run_forever()
    finally:
        purger.stop()
    return 0
