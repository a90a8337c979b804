"""The ``triagenode`` command.

Each subcommand lives in its own module here with a ``register(subparsers, parent)`` function
that adds its parser and sets ``handler``; handlers import heavy dependencies lazily so that
``triagenode --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from triagenode import __version__
from triagenode.errors import TriageNodeError

__all__ = ["main"]

# Module names under triagenode.cli, in the order --help lists them.
COMMANDS = (
    "serve",
    "classify",
    "studies",
    "exports",
    "triage",
    "audit",
    "token",
    "model",
    "optimize",
    "benchmark",
    "db",
    "purge",
    "api",
)


def build_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="triagenode.toml to read (default: ./triagenode.toml when present)",
    )
    parent.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser = argparse.ArgumentParser(
        prog="triagenode",
        description="DICOM AI triage node: receive, classify with BiomedCLIP, report as SR.",
    )
    parser.add_argument("--version", action="version", version=f"triagenode {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"triagenode.cli.{name}").register(subparsers, parent)
    return parser


# Everything the node writes (received images, SRs, the SQLite database, keys) may hold
# patient data or secrets: owner-only, whatever the account's umask says.
PRIVATE_UMASK = 0o077


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    parser = build_parser()
    args = parser.parse_args(argv)
    from triagenode.logs import configure_logging

    configure_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except TriageNodeError as exc:
        print(f"triagenode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("triagenode").info("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
