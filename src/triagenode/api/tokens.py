"""API bearer tokens: created once, stored as SHA-256, revocable, optionally expiring.

A token is ``tn_`` plus 256 random bits (URL-safe base64). Only its SHA-256 is stored, so a
database copy cannot be used to call the API; lookups go by that hash and the final
comparison is constant-time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from triagenode.errors import TriageNodeError
from triagenode.store.db import Database
from triagenode.store.models import ApiToken, utcnow

__all__ = ["AuthFailure", "Principal", "Role", "TokenInfo", "TokenStore", "hash_token"]

_PREFIX = "tn_"
# last_used_at is refreshed at most this often, so reads do not turn into writes.
_TOUCH_EVERY = timedelta(seconds=60)


class Role(str, enum.Enum):
    """What a token may do; each role includes the ones below it."""

    auditor = "auditor"  # read studies, queue, exports and the audit trail
    operator = "operator"  # also reprocess, complete, retry exports, predict
    admin = "admin"  # also manage tokens

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.auditor: 1, Role.operator: 2, Role.admin: 3}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A token as shown to people: never its hash."""

    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role."""

    name: str
    role: Role
    first_use: bool = False


class AuthFailure(Exception):
    """Why a presented token was refused: missing, unknown, revoked or expired."""

    def __init__(self, reason: str, name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.name = name


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(
        row.name, row.role, row.created_at, row.expires_at, row.revoked_at, row.last_used_at
    )


class TokenStore:
    """Creates, lists, revokes and checks API tokens."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, role: Role | str, expires_days: float | None = None) -> str:
        """Create a token and return it in clear: the only time it is ever available.

        Raises
        ------
        TriageNodeError
            When the name is taken or the role unknown.
        """
        try:
            role = Role(role)
        except ValueError:
            allowed = ", ".join(r.value for r in Role)
            raise TriageNodeError(f"role {role!r}: unknown; allowed: {allowed}") from None
        if (
            not name
            or len(name) > 64
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise TriageNodeError(f"token name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        token = _PREFIX + secrets.token_urlsafe(32)
        expires = utcnow() + timedelta(days=expires_days) if expires_days else None
        try:
            with self.db.write_session() as session:
                session.add(
                    ApiToken(
                        name=name, role=role.value, token_hash=hash_token(token), expires_at=expires
                    )
                )
        except IntegrityError:
            raise TriageNodeError(f"token name {name!r}: already exists") from None
        return token

    def list(self) -> list[TokenInfo]:
        with self.db.session() as session:
            return [_info(r) for r in session.scalars(select(ApiToken).order_by(ApiToken.name))]

    def revoke(self, name: str) -> bool:
        """Revoke the named token; False when there is no such active token."""
        with self.db.write_session() as session:
            row = session.scalar(select(ApiToken).where(ApiToken.name == name))
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True

    def authenticate(self, token: str | None) -> Principal:
        """The principal a presented token stands for.

        Raises
        ------
        AuthFailure
            ``missing``, ``unknown``, ``revoked`` or ``expired`` (with the token's name when
            it is known).
        """
        if not token:
            raise AuthFailure("missing")
        digest = hash_token(token)
        with self.db.session() as session:
            row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
            if row is None or not hmac.compare_digest(row.token_hash, digest):
                raise AuthFailure("unknown")
            now = utcnow()
            if row.revoked_at is not None:
                raise AuthFailure("revoked", row.name)
            if row.expires_at is not None and row.expires_at <= now:
                raise AuthFailure("expired", row.name)
            name, role, last_used = row.name, Role(row.role), row.last_used_at
        if last_used is None or now - last_used > _TOUCH_EVERY:
            with self.db.write_session() as session:
                fresh = session.scalar(select(ApiToken).where(ApiToken.name == name))
                if fresh is not None:
                    fresh.last_used_at = now
        return Principal(name, role, first_use=last_used is None)
