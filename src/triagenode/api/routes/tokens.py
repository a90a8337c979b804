"""``/api/v1/tokens``: list and revoke API tokens (admin role). Hashes never leave the node;
tokens are created on the command line (``triagenode token create``), where they are shown
once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from triagenode.api.deps import CallAuditDep, require
from triagenode.api.problems import Problem
from triagenode.api.schemas import ActionResult, TokenOut
from triagenode.api.tokens import Principal, Role, TokenStore
from triagenode.audit.events import AuditEventId

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])
Lister = Annotated[Principal, Depends(require(Role.admin, AuditEventId.query, "R", "tokens"))]
Revoker = Annotated[
    Principal,
    Depends(
        require(Role.admin, AuditEventId.security_alert, "U", "user_security_attributes_changed")
    ),
]


@router.get("", response_model=list[TokenOut], summary="API tokens, without their secrets")
def list_tokens(request: Request, _: Lister) -> list[TokenOut]:
    store: TokenStore = request.app.state.tokens
    return [
        TokenOut(
            name=t.name,
            role=t.role,
            status=t.status,  # type: ignore[arg-type]
            created_at=t.created_at,
            expires_at=t.expires_at,
            revoked_at=t.revoked_at,
            last_used_at=t.last_used_at,
        )
        for t in store.list()
    ]


@router.post("/{name}/revoke", response_model=ActionResult, summary="Revoke a token now")
def revoke_token(name: str, request: Request, _: Revoker, call: CallAuditDep) -> ActionResult:
    call.details["token"] = name
    store: TokenStore = request.app.state.tokens
    if not store.revoke(name):
        raise Problem(404, f"no active token named {name!r}", "not-found")
    return ActionResult(action="revoke", changed=True, state="revoked")
