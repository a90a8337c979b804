"""Study state transitions, each recorded as a :class:`StudyEvent`."""

from __future__ import annotations

from sqlalchemy.orm import Session

from triagenode.domain import StudyState
from triagenode.store.models import Study, StudyEvent, utcnow

__all__ = ["set_study_state"]


def set_study_state(session: Session, study_id: int, state: StudyState, reason: str | None) -> bool:
    """Move a study to ``state`` and record the transition; False if it was already there
    with the same reason (nothing recorded)."""
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study id {study_id} does not exist")
    if study.state == state.value and study.state_reason == reason:
        return False
    session.add(
        StudyEvent(study_id=study_id, from_state=study.state, to_state=state.value, reason=reason)
    )
    study.state = state.value
    study.state_reason = reason
    study.state_changed_at = utcnow()
    return True
