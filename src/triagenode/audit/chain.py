"""The keyed hash chain that makes the audit trail tamper-evident.

Each row's ``row_hash`` is an HMAC-SHA256, under a key derived from the audit secret, over
the row's content, its position ``seq`` and ``prev_hash`` (the previous row's ``row_hash``).
Whoever lacks the secret cannot edit, delete, insert or reorder rows without breaking the
chain, and :func:`verify` reports the first place where it breaks.

Appending takes a chain-wide lock first (SQLite: the database write lock; PostgreSQL: a
transaction-scoped advisory lock), then reads the tail and writes ``seq = tail + 1``; the
unique index on ``seq`` is the last guard, so concurrent writers can fail but never fork.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, utcnow

__all__ = [
    "GENESIS",
    "ChainProblem",
    "VerifyReport",
    "append",
    "canonical_details",
    "chain_head",
    "chain_key",
    "row_digest",
    "verify",
]

GENESIS = "0" * 64
# Any fixed 63-bit number: PostgreSQL advisory locks are keyed by a bigint.
_PG_LOCK_KEY = 0x7472_6961_6765_0001
# How far from its stored position verify() looks for a row's original one (reordering).
_SEARCH_WINDOW = 64

ProblemKind = Literal["edited", "deleted", "inserted", "reordered", "forged"]


def chain_key(secret: bytes) -> bytes:
    """The chain's HMAC key, derived from the audit secret.

    A separate key keeps chain hashes and patient pseudonyms (also keyed by the secret)
    from ever being comparable.
    """
    return hmac.new(secret, b"triagenode/audit-chain/v1", hashlib.sha256).digest()


def canonical_details(details: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``details`` as the database will return it (JSON round trip), or None."""
    if details is None:
        return None
    stored: dict[str, Any] = json.loads(json.dumps(details, sort_keys=True, default=str))
    return stored


def _iso(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def row_digest(key: bytes, row: Any, seq: int | None = None) -> str:
    """The keyed hash of one row (an :class:`AuditEvent` or a result row with its columns).

    Parameters
    ----------
    key
        From :func:`chain_key`.
    row
        Anything with the audit columns as attributes.
    seq
        The position to hash the row at; default the row's own ``seq``.
    """
    payload = [
        row.seq if seq is None else seq,
        _iso(row.at),
        row.event_id,
        row.event_type,
        row.action,
        int(row.outcome),
        row.actor,
        row.actor_address,
        row.study_uid,
        row.patient_ref,
        row.details,
        row.prev_hash,
    ]
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, data.encode("utf-8"), hashlib.sha256).hexdigest()


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    else:
        # A write statement takes SQLite's write lock now (a no-op in a write_session, which
        # already holds it), so the tail read below cannot be stale.
        session.execute(text("UPDATE audit_events SET seq = seq WHERE 1 = 0"))


def chain_head(session: Session) -> tuple[int, str] | None:
    """(seq, row_hash) of the chain's last row, or None while the chain is empty."""
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.row_hash)
        .where(AuditEvent.seq.is_not(None))
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    return None if head is None else (int(head.seq), str(head.row_hash))


def append(session: Session, key: bytes, row: AuditEvent) -> AuditEvent:
    """Chain ``row`` after the current tail, in ``session``'s transaction, and flush it.

    The lock is held until that transaction ends, so keep audit-writing transactions short.
    """
    _lock_chain(session)
    tail = chain_head(session)
    row.seq = 1 if tail is None else tail[0] + 1
    row.prev_hash = GENESIS if tail is None else tail[1]
    # Stamped under the lock, so time order follows chain order.
    row.at = utcnow()
    row.details = canonical_details(row.details)
    row.row_hash = row_digest(key, row)
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class ChainProblem:
    """The first place where the chain breaks."""

    kind: ProblemKind
    seq: int | None  # the position where the break shows; None for rows without a position
    row_id: int | None
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    ``vouched`` rows, from ``first_at`` to ``last_at``, are intact; a clean report vouches
    for all ``count`` rows. Deleting the newest rows leaves no trace inside the chain: that is
    what ``checkpoints`` (how many signed checkpoints were checked; None when none were) and
    an earlier report's ``head_seq``/``head_hash`` catch.
    """

    ok: bool
    count: int
    vouched: int
    first_at: datetime | None
    last_at: datetime | None
    head_seq: int | None
    head_hash: str | None
    problem: ChainProblem | None
    checkpoints: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("first_at", "last_at"):
            value = getattr(self, name)
            data[name] = value.isoformat() if value else None
        if self.checkpoints is None:  # not checked: the API's schema does not know the key
            del data["checkpoints"]
        return data


_COLUMNS = (
    AuditEvent.id,
    AuditEvent.seq,
    AuditEvent.at,
    AuditEvent.event_id,
    AuditEvent.event_type,
    AuditEvent.action,
    AuditEvent.outcome,
    AuditEvent.actor,
    AuditEvent.actor_address,
    AuditEvent.study_uid,
    AuditEvent.patient_ref,
    AuditEvent.details,
    AuditEvent.prev_hash,
    AuditEvent.row_hash,
)


def _with_next(rows: Iterator[Any]) -> Iterator[tuple[Any, Any | None]]:
    previous = next(rows, None)
    for row in rows:
        yield previous, row
        previous = row
    if previous is not None:
        yield previous, None


def _matches(key: bytes, row: Any, seq: int) -> bool:
    return hmac.compare_digest(row_digest(key, row, seq), row.row_hash or "")


def _original_seq(key: bytes, row: Any) -> int | None:
    """The position a row was hashed at, when it moved by at most the search window."""
    for distance in range(1, _SEARCH_WINDOW + 1):
        for seq in (int(row.seq) + distance, int(row.seq) - distance):
            if seq >= 1 and _matches(key, row, seq):
                return seq
    return None


def _diagnose(
    key: bytes, row: Any, following: Any | None, expected_seq: int, expected_prev: str
) -> ChainProblem:
    """Name what happened at ``row``, the first row that does not fit the chain."""

    def problem(kind: ProblemKind, message: str) -> ChainProblem:
        return ChainProblem(kind, row.seq, row.id, message)

    if _matches(key, row, row.seq):
        if row.seq != expected_seq:
            missing = (
                f"{expected_seq}"
                if row.seq == expected_seq + 1
                else (f"{expected_seq} to {row.seq - 1}")
            )
            return problem("deleted", f"row(s) {missing} missing before row {row.seq}")
        return problem("edited", f"row {row.seq} does not link to row {expected_seq - 1}")
    original = _original_seq(key, row)
    if original is None:
        if following is not None and following.prev_hash == expected_prev:
            return problem("inserted", f"row {row.seq} was inserted into the chain")
        if following is not None and following.prev_hash == row.row_hash:
            return problem("edited", f"row {row.seq} was changed after it was written")
        if row.prev_hash != expected_prev:
            return problem("inserted", f"row {row.seq} was never part of the chain")
        return problem("edited", f"row {row.seq} does not match its hash (edited or forged)")
    if original > row.seq:
        if following is not None and _matches(key, following, row.seq):
            return problem("reordered", f"rows {row.seq} and {following.seq} were swapped")
        return problem(
            "deleted",
            f"row(s) before row {row.seq} were deleted and the rest renumbered "
            f"(this row was {original})",
        )
    return problem(
        "inserted",
        f"row(s) were inserted before row {row.seq} and the rest renumbered "
        f"(this row was {original})",
    )


def _check_anchor(
    session: Session, anchor: tuple[int, str], head_seq: int | None
) -> ChainProblem | None:
    seq, expected = anchor
    if head_seq is None or head_seq < seq:
        return ChainProblem(
            "deleted",
            (head_seq or 0) + 1,
            None,
            f"the chain ends at row {head_seq or 0} but an earlier report saw row {seq}: "
            "its newest rows were deleted",
        )
    stored = session.scalar(select(AuditEvent.row_hash).where(AuditEvent.seq == seq))
    if stored != expected:
        return ChainProblem(
            "edited", seq, None, f"row {seq} differs from the one an earlier report vouched for"
        )
    return None


def verify(db: Database, secret: bytes, anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Walk the whole audit chain and report the first edited, deleted, inserted or
    reordered row.

    Parameters
    ----------
    db
        The node's database.
    secret
        The audit secret the rows were written with.
    anchor
        ``(head_seq, head_hash)`` of an earlier report, kept outside the database: the chain
        must still contain that row unchanged. This catches what the chain alone cannot,
        the deletion of its newest rows.

    Returns
    -------
    VerifyReport
        ``ok`` when every row is intact, with how many rows and which time range it vouches
        for; otherwise the first :class:`ChainProblem`.
    """
    key = chain_key(secret)
    expected_seq, expected_prev = 1, GENESIS
    vouched = 0
    first_at = last_at = None
    head_seq: int | None = None
    head_hash: str | None = None
    found: ChainProblem | None = None
    with db.session() as session:
        count = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
        stream = session.execute(
            select(*_COLUMNS)
            .where(AuditEvent.seq.is_not(None))
            .order_by(AuditEvent.seq)
            .execution_options(yield_per=1000)
        )
        for row, following in _with_next(iter(stream)):
            intact = (
                row.seq == expected_seq
                and row.prev_hash == expected_prev
                and _matches(key, row, row.seq)
            )
            if not intact:
                found = _diagnose(key, row, following, expected_seq, expected_prev)
                break
            vouched += 1
            first_at = first_at or row.at
            last_at = row.at
            head_seq, head_hash = row.seq, row.row_hash
            expected_seq, expected_prev = row.seq + 1, row.row_hash
        if found is None and anchor is not None:
            found = _check_anchor(session, anchor, head_seq)
        if found is None:
            stray = session.execute(
                select(AuditEvent.id).where(AuditEvent.seq.is_(None)).limit(1)
            ).first()
            if stray is not None:
                found = ChainProblem(
                    "inserted", None, stray.id, f"row id {stray.id} has no place in the chain"
                )
    return VerifyReport(
        ok=found is None,
        count=int(count),
        vouched=vouched,
        first_at=first_at,
        last_at=last_at,
        head_seq=head_seq,
        head_hash=head_hash,
        problem=found,
    )
