"""Connections and OAuth 2 through the job path: a real Authlib authorization server and a
resource server on loopback (tests/oauth_server.py), the receiver's callback, a real worker.

Each test uses connections of its own (its own end users), so the tests do not depend on
each other's tokens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import redis
import requests
from celery.signals import before_task_publish
from conftest import (
    OAUTH_GITHUB_KEY,
    OAUTH_JWT_KEY,
    OAUTH_MACHINE_SECRET,
    OAUTH_WEBAPP_SECRET,
    REDIS_URL,
    most_in_window,
)
from handlers_for_tests import runs_key
from oauth_flow import browse, connect
from procs import cli
from sqlalchemy import delete, func, select, update

from integrations.errors import InvalidParams, PermanentError
from integrations.ledger import connections as ledger
from integrations.ledger import reads
from integrations.ledger.db import get_engine
from integrations.ledger.models import Event, Job, OAuthState, utcnow
from tasks import call_service, replay

pytestmark = pytest.mark.usefixtures("worker", "oauth", "receiver")


@pytest.fixture
def user() -> str:
    """A fresh end user (and connection name) for this test."""
    return "u" + uuid.uuid4().hex[:10]


def echo(service: str, key: str, connection: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = call_service.delay(service, "echo", {"key": key}, connection=connection).get(
        timeout=30
    )
    return out


def expire(service: str, name: str) -> None:
    """Make the stored access token look as if it expired (the next job renews it first)."""
    with get_engine().begin() as conn:
        conn.execute(
            update(ledger.connections)
            .where(ledger.connections.c.service == service, ledger.connections.c.name == name)
            .values(expires_at=utcnow() - dt.timedelta(seconds=5))
        )


def forget(service: str, name: str) -> None:
    with get_engine().begin() as conn:
        conn.execute(
            delete(ledger.connections).where(
                ledger.connections.c.service == service, ledger.connections.c.name == name
            )
        )


def count(table: Any) -> int:
    with get_engine().connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


# ------------------------------------------------------------------------------------------------
# The service's own token: client credentials
# ------------------------------------------------------------------------------------------------


def test_the_service_token_is_got_once_and_shared_by_every_job(oauth: Any, key: str) -> None:
    forget("oauth_machine", "*")
    store = oauth.store
    before = store.grants["client_credentials"]
    results = [call_service.delay("oauth_machine", "echo", {"key": key}) for _ in range(10)]
    outs = [r.get(timeout=30) for r in results]
    assert [o["status"] for o in outs] == ["succeeded"] * 10
    assert {o["data"]["client"] for o in outs} == {"machine"}
    assert store.grants["client_credentials"] - before == 1
    hits = store.hits_for(key)
    assert len(hits) == 10 and len({h.token for h in hits}) == 1
    row = ledger.get("oauth_machine", "*")
    assert row is not None and row.status == "active" and row.tokens is not None
    assert hits[0].token is not None and hits[0].token not in row.tokens  # encrypted at rest


def test_the_service_token_is_renewed_shortly_before_it_expires(oauth: Any, key: str) -> None:
    forget("oauth_machine", "*")
    store = oauth.store
    store.lifetimes["client_credentials"] = 2  # refresh_skew is 1 s
    try:
        before = store.grants["client_credentials"]
        echo("oauth_machine", key)
        echo("oauth_machine", key)  # well within the token's first second
        time.sleep(1.2)
        echo("oauth_machine", key)  # under a second left: renewed first
    finally:
        store.lifetimes.pop("client_credentials")
    assert store.grants["client_credentials"] - before == 2
    tokens = [h.token for h in store.hits_for(key)]
    assert tokens[0] == tokens[1] != tokens[2]
    assert all(h.status == 200 for h in store.hits_for(key))


# ------------------------------------------------------------------------------------------------
# The authorization-code flow, through the receiver's callback
# ------------------------------------------------------------------------------------------------


def test_a_user_authorizes_through_the_callback_and_jobs_act_for_them(
    oauth: Any, user: str, key: str
) -> None:
    out = cli("connections", "add", "oauth_user", user)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip().splitlines()[-1]
    query = parse_qs(urlsplit(url).query)
    assert query["response_type"] == ["code"] and query["client_id"] == ["webapp"]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["scope"] == ["read calendar"] and query["access_type"] == ["offline"]
    pending = ledger.get("oauth_user", user)
    assert pending is not None and pending.status == "pending" and pending.tokens is None

    page = browse(url, user)

    assert page.status_code == 200 and "Connected" in page.text, page.text
    assert page.headers["cache-control"] == "no-store"
    row = ledger.get("oauth_user", user)
    assert row is not None and row.status == "active" and row.scopes == ["read", "calendar"]
    assert row.expires_at is not None and row.expires_at > utcnow()
    done = echo("oauth_user", key, connection=user)
    assert done["status"] == "succeeded" and done["data"]["user"] == user
    job = reads.get_job(done["job_id"])
    assert job is not None and job["connection"] == user

    # The same callback again (a replay): refused, and the connection is as it was.
    exchanges = oauth.store.grants["authorization_code"]
    replayed = requests.get(page.url, timeout=10)
    assert replayed.status_code == 400 and "already used" in replayed.text
    assert oauth.store.grants["authorization_code"] == exchanges
    again = ledger.get("oauth_user", user)
    assert again is not None and (again.version, again.status) == (row.version, "active")


def callback(receiver: str, **params: str) -> requests.Response:
    return requests.get(f"{receiver}/oauth/callback?{urlencode(params)}", timeout=10)


def test_a_forged_expired_or_refused_authorization_changes_nothing(
    oauth: Any, receiver: str, user: str
) -> None:
    from integrations.auth import authorize
    from integrations.services import get_services

    svc = get_services()["oauth_user"]
    exchanges = oauth.store.grants["authorization_code"]
    connect("oauth_user", user, user)
    row = ledger.get("oauth_user", user)
    assert row is not None
    states = count(ledger.states)

    forged = callback(receiver, state="forged-" + uuid.uuid4().hex, code="whatever")
    no_state = callback(receiver, code="whatever")
    assert (forged.status_code, no_state.status_code) == (400, 400)
    assert "unknown or was already used" in forged.text and "no valid state" in no_state.text
    assert count(ledger.states) == states

    url = authorize.start(svc, user)  # re-authorizing an active connection
    with get_engine().begin() as conn:
        conn.execute(
            update(OAuthState)
            .where(OAuthState.connection == user)
            .values(expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    late = browse(url, user)
    assert late.status_code == 400 and "expired" in late.text

    denied = browse(authorize.start(svc, user), user, deny=True)
    assert denied.status_code == 400 and "access_denied" in denied.text

    assert oauth.store.grants["authorization_code"] == exchanges + 1  # the first connect only
    after = ledger.get("oauth_user", user)
    assert after is not None and (after.status, after.version, after.tokens) == (
        "active",
        row.version,
        row.tokens,
    )


# ------------------------------------------------------------------------------------------------
# Submitting: a connection where one is needed, none elsewhere
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def published() -> Iterator[list[Any]]:
    seen: list[Any] = []

    def record(sender: str, body: Any, **_: Any) -> None:
        seen.append((sender, body))

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


@pytest.mark.parametrize(
    ("service", "connection", "expected"),
    [
        ("oauth_user", None, "service oauth_user acts for an end user: give connection=<name>"),
        ("oauth_machine", "alice", "service oauth_machine has no per-user connections"),
        ("stub", "alice", "service stub has no per-user connections"),
        ("oauth_user", "", "connection must be 1 to 100 letters"),
        ("oauth_user", "../alice", "connection must be 1 to 100 letters"),
        ("oauth_user", "a" * 101, "connection must be 1 to 100 letters"),
    ],
)
def test_a_job_names_a_connection_exactly_when_the_service_acts_for_users(
    service: str, connection: str | None, expected: str, published: list[Any]
) -> None:
    with get_engine().connect() as conn:
        before = conn.execute(select(func.count()).select_from(Job)).scalar_one()
    with pytest.raises(InvalidParams, match=expected.replace("(", r"\(").replace(")", r"\)")):
        call_service.delay(service, "echo", {"key": "k"}, connection=connection)
    with get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == before
    assert published == []


def test_the_broker_carries_the_job_id_and_never_the_connection(
    oauth: Any, user: str, key: str, published: list[Any]
) -> None:
    connect("oauth_user", user, user)
    echo("oauth_user", key, connection=user)
    (msg,) = [m for m in published if m[0] == "integrations.call.oauth_user"]
    assert user not in json.dumps(msg) and key not in json.dumps(msg)


# ------------------------------------------------------------------------------------------------
# 401s, invalid_grant, a token endpoint that is down
# ------------------------------------------------------------------------------------------------


def test_a_401_with_a_token_believed_valid_costs_one_renewal_and_one_more_try(
    oauth: Any, user: str, key: str
) -> None:
    store = oauth.store
    connect("oauth_user", user, user)
    first = echo("oauth_user", key, connection=user)
    (hit,) = store.hits_for(key)
    assert hit.token is not None
    store.revoke_access(hit.token)  # the provider dropped it early (a password change, say)
    refreshes = len(store.refreshes)

    second = echo("oauth_user", key, connection=user)

    assert first["status"] == second["status"] == "succeeded" and second["attempts"] == 1
    assert [h.status for h in store.hits_for(key)] == [200, 401, 200]
    assert len(store.refreshes) == refreshes + 1


def test_a_second_401_fails_the_job_after_one_renewal(oauth: Any, user: str, key: str) -> None:
    store = oauth.store
    connect("oauth_user", user, user)
    store.always_401.add(f"/api/echo/{key}")
    refreshes = len(store.refreshes)
    r = call_service.delay("oauth_user", "echo", {"key": key}, connection=user)
    with pytest.raises(PermanentError, match="HTTP 401"):
        r.get(timeout=30)
    assert [h.status for h in store.hits_for(key)] == [401, 401]
    assert len(store.refreshes) == refreshes + 1
    job = reads.get_job(r.id)
    assert job is not None and job["attempts"] == 1 and job["status"] == "failed"
    row = ledger.get("oauth_user", user)
    assert row is not None and row.status == "active"  # the token is fine; the upstream said no


def test_invalid_grant_needs_reauth_fails_the_jobs_at_once_and_tells_the_handlers(
    oauth: Any, user: str, key: str
) -> None:
    store = oauth.store
    connect("oauth_user", user, user)
    store.revoke_user(user)  # the user withdrew the app's access at the provider
    expire("oauth_user", user)
    invalid = store.invalid_grants

    results = [call_service.delay("oauth_user", "echo", {"key": key}, connection=user) for _ in range(4)]

    for r in results:
        with pytest.raises(PermanentError) as e:
            r.get(timeout=30)
        assert str(e.value) == f"connection {user} of oauth_user needs re-authorization"
        job = reads.get_job(r.id)
        assert job is not None and job["attempts"] == 1 and job["status"] == "failed"
    assert store.hits_for(key) == []  # the upstream was never called
    assert store.invalid_grants == invalid + 1  # one refresh tried; the others knew
    row = ledger.get("oauth_user", user)
    assert row is not None and row.status == "needs_reauth" and "invalid_grant" in (row.last_error or "")

    with get_engine().connect() as conn:
        (event_id, payload) = conn.execute(
            select(Event.id, Event.payload)
            .where(Event.source == "connection", Event.event_type == "needs_reauth")
            .where(Event.delivery_id.like(f"oauth_user/{user}/%"))
        ).one()
    assert payload["service"] == "oauth_user" and payload["connection"] == user
    r = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + 20
    while not r.get(runs_key("on_needs_reauth", event_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.get(runs_key("on_needs_reauth", event_id)) == b"1"
    assert f"oauth_user/{user}".encode() in r.lrange("test:needs_reauth", 0, -1)

    # The user connects again: the connection is active, and jobs act for them again; a failed
    # job replayed acts for the same connection.
    connect("oauth_user", user, user)
    assert echo("oauth_user", key, connection=user)["data"]["user"] == user
    again = replay(results[0].id).get(timeout=30)
    assert again["status"] == "succeeded" and again["data"]["user"] == user
    new_job = reads.get_job(again["job_id"])
    assert new_job is not None and (new_job["connection"], new_job["replay_of"]) == (user, results[0].id)


def test_a_token_endpoint_that_is_down_is_retried_and_the_connection_stays_active(
    oauth: Any, user: str, key: str
) -> None:
    store = oauth.store
    connect("oauth_user", user, user)
    expire("oauth_user", user)
    store.fail_next = 2

    out = echo("oauth_user", key, connection=user)

    assert out["status"] == "succeeded" and out["attempts"] == 3
    job = reads.get_job(out["job_id"], with_attempts=True)
    assert job is not None
    errors = [a["error"] for a in job["attempts_log"]]
    down = "oauth_user: the token endpoint answered the refresh token with HTTP 503 (temporarily_unavailable)"
    assert errors[:2] == [down, down]
    assert len(store.hits_for(key)) == 1
    row = ledger.get("oauth_user", user)
    assert row is not None and row.status == "active" and row.last_error is None


# ------------------------------------------------------------------------------------------------
# JWT bearer (RFC 7523) and GitHub Apps
# ------------------------------------------------------------------------------------------------


def test_a_jwt_bearer_connection_acts_as_its_subject(oauth: Any, key: str) -> None:
    subject = f"carol-{uuid.uuid4().hex[:6]}@example.com"
    added = cli("connections", "add", "oauth_jwt", "carol", "--subject", subject)
    assert added.returncode == 0, added.stderr
    before = oauth.store.grants["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    out = echo("oauth_jwt", key, connection="carol")
    assert out["data"]["user"] == subject and out["data"]["client"] == "svcacct"
    echo("oauth_jwt", key, connection="carol")
    assert oauth.store.grants["urn:ietf:params:oauth:grant-type:jwt-bearer"] == before + 1


def test_a_github_app_installation_token_is_got_once_and_an_uninstalled_app_needs_reauth(
    oauth: Any, key: str
) -> None:
    store = oauth.store
    installation = str(uuid.uuid4().int % 10**8)
    store.github_installations[installation] = "acme"
    name = "acme" + installation
    assert cli("connections", "add", "oauth_github", name, "--subject", installation).returncode == 0
    before = store.grants["github"]
    for _ in range(3):
        out = call_service.delay("oauth_github", "repo", {"owner": "acme", "repo": key}, connection=name).get(
            timeout=30
        )
        assert out["data"] == {"full_name": f"acme/{key}", "owner": "acme"}
    assert store.grants["github"] == before + 1

    del store.github_installations[installation]  # uninstalled
    expire("oauth_github", name)
    r = call_service.delay("oauth_github", "repo", {"owner": "acme", "repo": key}, connection=name)
    with pytest.raises(PermanentError, match=f"connection {name} of oauth_github needs re-authorization"):
        r.get(timeout=30)


# ------------------------------------------------------------------------------------------------
# The CLI: revoke, list, show
# ------------------------------------------------------------------------------------------------


def test_revoke_tells_the_provider_deletes_the_tokens_and_later_jobs_fail(
    oauth: Any, user: str, key: str
) -> None:
    store = oauth.store
    connect("oauth_user", user, user)
    echo("oauth_user", key, connection=user)
    out = cli("connections", "revoke", user, "--service", "oauth_user")
    assert out.returncode == 0, out.stderr
    assert "revoked at the provider" in out.stdout
    refresh = next(t.refresh_token for t in reversed(store.tokens) if t.user == user)
    assert store.revocations[-1] == refresh
    row = ledger.get("oauth_user", user)
    assert row is not None and (row.status, row.tokens) == ("revoked", None)
    with pytest.raises(PermanentError, match=f"connection {user} of oauth_user was revoked"):
        call_service.delay("oauth_user", "echo", {"key": key}, connection=user).get(timeout=30)
    assert len(store.hits_for(key)) == 1


def test_list_and_show_say_everything_but_the_tokens(oauth: Any, user: str, key: str) -> None:
    connect("oauth_user", user, user)
    echo("oauth_user", key, connection=user)
    listed = cli("connections", "list", "--service", "oauth_user")
    shown = cli("connections", "show", user)
    assert listed.returncode == 0 and shown.returncode == 0, listed.stderr + shown.stderr
    assert user in listed.stdout and "active" in listed.stdout and "read calendar" in listed.stdout
    assert "encrypted with key" in shown.stdout and "never shown" in shown.stdout
    for token in oauth.store.issued():
        assert token not in listed.stdout + shown.stdout


# ------------------------------------------------------------------------------------------------
# Per-connection rate limits
# ------------------------------------------------------------------------------------------------


def test_each_connection_has_its_own_rate_limit(oauth: Any, key: str) -> None:
    users = [f"kim{uuid.uuid4().hex[:6]}", f"lee{uuid.uuid4().hex[:6]}"]
    for u in users:
        connect("oauth_limited", u, u)
    results = [
        call_service.delay("oauth_limited", "echo", {"key": f"{key}-{u}"}, connection=u)
        for _ in range(8)
        for u in users
    ]
    for r in results:
        assert r.get(timeout=60)["status"] == "succeeded"
    spans = []
    for u in users:
        times = sorted(h.at for h in oauth.store.hits_for(f"{key}-{u}"))
        assert len(times) == 8
        assert most_in_window(times) <= 4 + 1  # rate + burst in any second
        assert times[-1] - times[0] >= 7 / 4 - 0.2  # 4/s for each user
        spans.append((times[0], times[-1]))
    # The users' calls went side by side, not one user's after the other's.
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


# ------------------------------------------------------------------------------------------------
# Tokens nowhere but encrypted in the ledger
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def task_events(app: Any) -> Iterator[list[dict[str, Any]]]:
    """Every event the workers send while the block runs (what Flower sees)."""
    seen: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        recv = app.events.Receiver(conn, handlers={"*": seen.append})
        thread = threading.Thread(target=recv.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            call_service.delay("stub", "echo", {"key": "warm-up"}).get(timeout=10)
            time.sleep(0.5)
        assert seen, "no task event within 20 s"
        try:
            yield seen
        finally:
            time.sleep(1.0)
            recv.should_stop = True
            thread.join(timeout=5)


def test_tokens_and_client_secrets_are_nowhere_but_encrypted_in_the_ledger(
    app: Any, oauth: Any, user: str, key: str, published: list[Any]
) -> None:
    store = oauth.store
    connect("oauth_user", user, user)
    with task_events(app) as events:
        ids = [echo("oauth_user", key, connection=user)["job_id"]]
        expire("oauth_user", user)  # a refresh on the way
        ids.append(echo("oauth_user", key, connection=user)["job_id"])
        failing = call_service.delay("oauth_user", "echo", {"key": key + "x"}, connection=user)
        store.always_401.add(f"/api/echo/{key}x")
        with pytest.raises(PermanentError):
            failing.get(timeout=30)
        ids.append(failing.id)
    secrets = [*store.issued(), OAUTH_MACHINE_SECRET, OAUTH_WEBAPP_SECRET, OAUTH_JWT_KEY, OAUTH_GITHUB_KEY]
    assert len(store.issued()) >= 4
    places: dict[str, str] = {
        "broker": json.dumps(published, default=str),
        "task events": json.dumps(events, default=str),
    }
    r = redis.Redis.from_url(REDIS_URL)
    stored = [r.get(k) for k in r.scan_iter("celery-task-meta-*")]
    places["result backend"] = "".join(v.decode(errors="replace") for v in stored if isinstance(v, bytes))
    for job_id in ids:
        places[f"job {job_id}"] = json.dumps(reads.get_job(job_id, with_attempts=True), default=str)
        places[f"cli job {job_id}"] = cli("job", job_id).stdout
    with get_engine().connect() as conn:
        places["connections table"] = json.dumps(
            [dict(m) for m in conn.execute(select(ledger.connections)).mappings()], default=str
        )
        places["events table"] = json.dumps(
            [dict(m) for m in conn.execute(select(Event)).mappings()], default=str
        )
    places["cli"] = "".join(
        cli(*c).stdout for c in (("connections", "list"), ("connections", "show", user), ("jobs",))
    )
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a credential in the {where}"
