"""Admin API access control: every route's token and role, refusals audited, rate limits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.api_support import STUDY_UID, ApiWorld, build_world, events, shared_world
from triagenode.api.tokens import TokenStore
from triagenode.store.db import Database
from triagenode.store.models import ApiToken, utcnow

# Every route under /api/v1 with the least role it needs; test_route_table_is_complete
# fails when a route is added without a row here.
ROUTES = [
    ("GET", "/api/v1/studies", "auditor"),
    ("GET", "/api/v1/studies/{study_uid}", "auditor"),
    ("POST", "/api/v1/studies/{study_uid}/reprocess", "operator"),
    ("POST", "/api/v1/studies/{study_uid}/complete", "operator"),
    ("GET", "/api/v1/queue", "auditor"),
    ("GET", "/api/v1/exports", "auditor"),
    ("POST", "/api/v1/exports/{export_id}/retry", "operator"),
    ("GET", "/api/v1/audit", "auditor"),
    ("GET", "/api/v1/audit/verify", "auditor"),
    ("GET", "/api/v1/audit/export", "auditor"),
    ("POST", "/api/v1/predict", "operator"),
    ("POST", "/api/v1/batch-predict", "operator"),
    ("GET", "/api/v1/tokens", "admin"),
    ("POST", "/api/v1/tokens/{name}/revoke", "admin"),
]
RANK = {"auditor": 1, "operator": 2, "admin": 3}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> ApiWorld:
    """One SQLite world for the many checks that change nothing."""
    return shared_world(tmp_path_factory.mktemp("auth"))


@pytest.fixture
def world(make_settings, db: Database) -> ApiWorld:
    """A fresh world on each database backend."""
    return build_world(make_settings(), db)


def _fill(path: str, world: ApiWorld) -> str:
    return path.format(study_uid=STUDY_UID, export_id=world.export_id, name="nobody")


def test_route_table_is_complete(shared: ApiWorld) -> None:
    documented = {
        (method.upper(), path)
        for path, operations in shared.app.openapi()["paths"].items()
        if path.startswith("/api/v1")
        for method in operations
    }
    assert documented == {(m, p) for m, p, _ in ROUTES}


@pytest.mark.parametrize(("method", "path", "role"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_a_token_and_its_role(
    shared: ApiWorld, method: str, path: str, role: str
) -> None:
    client = TestClient(shared.app)
    url = _fill(path, shared)
    body = {"image": "", "queries": ["x"]} if "predict" in path else None
    missing = client.request(method, url, json=body)
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["status"] == 401
    forged = client.request(method, url, json=body, headers={"Authorization": "Bearer tn_forged"})
    assert forged.status_code == 401
    for other in RANK:
        answer = client.request(method, url, json=body, headers=shared.auth(other))
        if RANK[other] < RANK[role]:
            assert answer.status_code == 403, other
            assert answer.json()["type"] == "urn:triagenode:problem:forbidden"
        else:
            assert answer.status_code not in (401, 403), (other, answer.text)


def test_refusals_are_security_alerts(world: ApiWorld) -> None:
    client = TestClient(world.app)
    client.get("/api/v1/audit")
    client.get("/api/v1/audit", headers={"Authorization": "Bearer tn_forged"})
    client.get("/api/v1/tokens", headers=world.auth("operator"))
    alerts = events(world, event_id="110113")
    assert [(a.event_type, a.actor, a.outcome) for a in alerts] == [
        ("missing_token", "anonymous", 4),
        ("unknown_token", "anonymous", 4),
        ("use_of_restricted_function", "operator-token", 4),
    ]
    assert all(a.actor_address == "testclient" for a in alerts)


def test_expired_and_revoked_tokens(world: ApiWorld) -> None:
    client = TestClient(world.app)
    store = TokenStore(world.db)
    expiring = store.create("short-lived", "auditor", expires_days=1)
    assert client.get("/api/v1/queue", headers={"Authorization": f"Bearer {expiring}"}).is_success
    with world.db.write_session() as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.name == "short-lived")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert (
        client.get("/api/v1/queue", headers={"Authorization": f"Bearer {expiring}"}).status_code
        == 401
    )
    revoked = client.post("/api/v1/tokens/auditor-token/revoke", headers=world.auth("admin"))
    assert revoked.json()["state"] == "revoked"
    assert client.get("/api/v1/queue", headers=world.auth("auditor")).status_code == 401
    kinds = [(e.event_type, e.actor) for e in events(world, event_id="110113")]
    assert ("expired_token", "short-lived") in kinds
    assert ("revoked_token", "auditor-token") in kinds
    assert ("user_security_attributes_changed", "admin-token") in kinds
    logins = events(world, event_id="110114")
    assert {e.actor for e in logins} >= {"short-lived", "admin-token"}


def test_tokens_listing_never_shows_secrets(world: ApiWorld) -> None:
    client = TestClient(world.app)
    answer = client.get("/api/v1/tokens", headers=world.auth("admin"))
    assert answer.status_code == 200
    with world.db.session() as session:
        hashes = list(session.scalars(select(ApiToken.token_hash)))
    for secret in [*hashes, *world.tokens.values()]:
        assert secret not in answer.text
    assert {t["name"] for t in answer.json()} == {"auditor-token", "operator-token", "admin-token"}
    assert "token_hash" not in answer.text


def test_rate_limit(make_settings, db: Database) -> None:
    world = build_world(make_settings(api={"rate_limit_per_minute": 3}), db)
    client = TestClient(world.app)
    codes = [
        client.get("/api/v1/queue", headers=world.auth("auditor")).status_code for _ in range(6)
    ]
    assert codes == [200, 200, 200, 429, 429, 429]
    limited = client.get("/api/v1/queue", headers=world.auth("auditor"))
    assert limited.headers["content-type"] == "application/problem+json"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Another token has its own budget.
    assert client.get("/api/v1/queue", headers=world.auth("operator")).status_code == 200
    assert len(events(world, event_type="rate_limited")) == 1


def test_rate_limiter_window_slides_and_forgets_idle_keys() -> None:
    from triagenode.api.ratelimit import RateLimiter

    now = [1000.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.check("a") == 0 and limiter.check("a") == 0
    assert limiter.check("a") == pytest.approx(60.0)
    now[0] += 30
    assert limiter.check("a") == pytest.approx(30.0)
    now[0] += 30.5
    assert limiter.check("a") == 0
    for i in range(10_001):
        limiter.check(f"address:{i}")
    now[0] += 61
    limiter.check("b")
    assert len(limiter._hits) == 1
