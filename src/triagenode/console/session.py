"""The console's sign-in session: a signed cookie that stands for an API token.

The token itself never goes into the cookie. The cookie names the token's row and carries a
random session nonce, signed with a key that lives only in this process, so a restart of the
API ends every session. Each request looks the token up again, so revoking or expiring the
token ends its console sessions at once, and a change of role applies at once.

Forms carry a CSRF token derived from the session nonce (a per-session secret): a page
from elsewhere can neither read it nor guess it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

__all__ = ["COOKIE", "LOGIN_COOKIE", "Session", "SessionCodec"]

COOKIE = "triagenode_session"
LOGIN_COOKIE = "triagenode_login"  # double-submit CSRF value of the sign-in form
_MAX_COOKIE = 512


@dataclass(frozen=True)
class Session:
    token_id: int
    token_name: str
    nonce: str
    expires_at: float


class SessionCodec:
    """Signs and checks session cookies and derives their CSRF tokens."""

    def __init__(self, lifetime_s: float = 8 * 3600, key: bytes | None = None) -> None:
        self.lifetime_s = lifetime_s
        self._key = key or secrets.token_bytes(32)

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, b"session:" + payload, hashlib.sha256).hexdigest()

    def issue(self, token_id: int, token_name: str) -> tuple[str, Session]:
        """A new session for the token: the cookie value and what it stands for."""
        expires = float(int(time.time() + self.lifetime_s))
        session = Session(token_id, token_name, secrets.token_hex(16), expires)
        payload = json.dumps(
            [session.token_id, session.token_name, session.nonce, int(session.expires_at)],
            separators=(",", ":"),
        ).encode()
        encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{encoded}.{self._sign(payload)}", session

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for, or None when it is absent, forged or expired."""
        if not cookie or len(cookie) > _MAX_COOKIE or "." not in cookie:
            return None
        encoded, signature = cookie.rsplit(".", 1)
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            token_id, name, nonce, expires = json.loads(payload)
        except (ValueError, TypeError):
            return None
        if expires < time.time():
            return None
        return Session(int(token_id), str(name), str(nonce), float(expires))

    def csrf(self, session: Session) -> str:
        """The CSRF token of a session's forms."""
        digest = hmac.new(self._key, b"csrf:" + session.nonce.encode(), hashlib.sha256)
        return digest.hexdigest()[:40]

    def csrf_ok(self, session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf(session), str(presented))
