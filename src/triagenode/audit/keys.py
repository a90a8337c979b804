"""The audit secret: from settings, or a random key kept in ``<data_dir>/audit.key``."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from triagenode.config.settings import Settings
from triagenode.errors import ConfigError

__all__ = ["KEY_FILE", "load_or_create_secret"]

log = logging.getLogger(__name__)
KEY_FILE = "audit.key"
_KEY_BYTES = 32


def load_or_create_secret(settings: Settings) -> bytes:
    """The audit secret as bytes.

    ``audit.secret`` when set; otherwise the key in ``<data_dir>/audit.key``, created on
    first use with 256 random bits and mode 0600. Losing the file makes existing chain
    hashes and patient pseudonyms unverifiable, so it is never overwritten.

    Raises
    ------
    ConfigError
        When the key file exists but cannot be read or is too short.
    """
    if settings.audit.secret is not None:
        value = settings.audit.secret.get_secret_value()
        if value:
            return value.encode("utf-8")
    path = Path(settings.node.data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    try:
        os.write(fd, secrets.token_hex(_KEY_BYTES).encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created a new audit key in %s", path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("audit key %s is readable by other users (mode %o); use 0600", path, mode)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"audit key {path}: cannot be read ({exc.strerror})") from None
    if len(key) < 32:
        raise ConfigError(
            f"audit key {path}: too short ({len(key)} bytes); expected 64 hex characters"
        )
    return key
