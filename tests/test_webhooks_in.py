"""Incoming webhooks through the real receiver served by uvicorn, to handlers run by a real worker.

Signatures come from the senders' own recipes: the standardwebhooks library, and GitHub's and
Slack's published examples (their exact bytes and expected signatures).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import procs
import pytest
import redis
import requests
from asgi_server import serve
from celery import Celery
from conftest import GH_SECRET, REDIS_URL, STD_SECRET_NEW, STD_SECRET_OLD, TOKEN, free_port
from handlers_for_tests import release_key, runs_key
from procs import BIN, env_with, running
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url
from standardwebhooks.webhooks import Webhook
from tcp_proxy import TcpProxy

from integrations.config import get_settings, get_webhooks
from integrations.ledger import events as ledger
from integrations.ledger.db import get_engine
from integrations.ledger.models import Event, EventHandling
from integrations.webhooks.receiver import create_app
from tasks.events import publish_event, requeue_stuck_events

pytestmark = pytest.mark.usefixtures("worker")

R = redis.Redis.from_url(REDIS_URL)

# GitHub's published example: secret "It's a Secret to Everybody", body "Hello, World!".
GITHUB_DOC_BODY = b"Hello, World!"
GITHUB_DOC_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
# Slack's published example: a slash command, signed at 1531420618.
SLACK_DOC_TIMESTAMP = 1531420618
SLACK_DOC_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_DOC_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    """The receiver on the real clock, publishing to the real broker."""
    app = create_app(get_webhooks(), publish_event, get_settings().webhook_max_body_bytes)
    with serve(app) as url:
        yield url


def serve_at(clock: Callable[[], float]) -> Any:
    return serve(create_app(get_webhooks(), publish_event, get_settings().webhook_max_body_bytes, clock))


def event_count(source: str | None = None) -> int:
    q = select(func.count()).select_from(Event)
    if source:
        q = q.where(Event.source == source)
    with get_engine().connect() as conn:
        return int(conn.execute(q).scalar_one())


def github_post(
    url: str, payload: Any, event: str = "pull_request", delivery: str | None = None, secret: str = GH_SECRET
) -> requests.Response:
    body = json.dumps(payload).encode()
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "X-Hub-Signature-256": sig,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "Content-Type": "application/json",
    }
    return requests.post(f"{url}/webhooks/gh", data=body, headers=headers, timeout=10)


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def handlings(event_id: str) -> dict[str, dict[str, Any]]:
    return {h["handler"].rsplit(".", 1)[1]: h for h in ledger.handlings_of(event_id)}


def runs(handler: str, event_id: str) -> int:
    return int(R.get(runs_key(handler, event_id)) or 0)


def test_a_github_event_goes_to_every_matching_handler_and_a_failing_one_is_retried_alone(
    receiver: str,
) -> None:
    r = github_post(receiver, {"action": "opened", "fail": 1})
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]

    def settled() -> bool:
        h = handlings(event_id)
        return len(h) == 3 and all(x["status"] == "succeeded" for x in h.values())

    wait_for(settled)
    h = handlings(event_id)
    assert set(h) == {"on_pull_request", "on_anything_from_github", "flaky"}
    assert h["flaky"]["attempts"] == 2  # failed once, retried on its own
    assert h["on_pull_request"]["attempts"] == h["on_anything_from_github"]["attempts"] == 1
    assert runs("on_pull_request", event_id) == runs("on_anything_from_github", event_id) == 1
    assert runs("flaky", event_id) == 2


def test_a_handler_that_keeps_failing_is_recorded_failed_and_the_others_succeed(receiver: str) -> None:
    r = github_post(receiver, {"action": "closed", "fail": 99})
    event_id = r.json()["event_id"]
    wait_for(lambda: handlings(event_id).get("flaky", {}).get("status") == "failed", timeout=30)
    h = handlings(event_id)
    assert h["flaky"]["attempts"] == 3  # HANDLER_MAX_RETRIES=2 in the tests
    assert "RuntimeError: flaky failed try 3" in h["flaky"]["error"]
    assert h["on_pull_request"]["status"] == h["on_anything_from_github"]["status"] == "succeeded"


def test_an_event_type_with_one_handler_goes_to_it_only(receiver: str) -> None:
    r = github_post(receiver, {"ref": "refs/heads/main"}, event="push")
    event_id = r.json()["event_id"]
    wait_for(lambda: handlings(event_id).get("on_anything_from_github", {}).get("status") == "succeeded")
    assert set(handlings(event_id)) == {"on_anything_from_github"}


def test_a_redelivery_is_answered_2xx_and_not_handled_again(receiver: str) -> None:
    delivery = str(uuid.uuid4())
    first = github_post(receiver, {"action": "opened"}, delivery=delivery)
    assert first.status_code == 202
    event_id = first.json()["event_id"]
    wait_for(
        lambda: len(handlings(event_id)) == 3 and all(h["finished_at"] for h in handlings(event_id).values())
    )
    again = github_post(receiver, {"action": "opened"}, delivery=delivery)
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    time.sleep(1)
    assert runs("on_pull_request", event_id) == 1
    with get_engine().connect() as conn:
        n = conn.execute(
            select(func.count()).select_from(Event).where(Event.delivery_id == delivery)
        ).scalar_one()
    assert n == 1


def test_the_receiver_answers_before_the_handlers_finish(receiver: str) -> None:
    # The "blocking" handler runs until released: a receiver that waited for handlers would
    # answer only after it (30 s at most), and find it succeeded.
    r = github_post(receiver, {"action": "opened"}, event="blocking")
    assert r.status_code == 202
    event_id = r.json()["event_id"]
    wait_for(lambda: "blocking" in handlings(event_id))
    assert handlings(event_id)["blocking"]["status"] in ("queued", "running")
    R.rpush(release_key(event_id), 1)
    wait_for(lambda: handlings(event_id)["blocking"]["status"] == "succeeded")


# --- refusals: nothing stored, nothing queued, no secret echoed ----------------------------------


def refused(url: str, path: str, body: bytes, headers: dict[str, str], status: int) -> str:
    before = event_count()
    r = requests.post(f"{url}{path}", data=body, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    for secret in (GH_SECRET, STD_SECRET_OLD, STD_SECRET_NEW, TOKEN):
        assert secret not in r.text
    assert event_count() == before
    return str(r.json()["error"])


def test_while_a_secret_is_rotated_the_previous_one_is_accepted_too(receiver: str) -> None:
    r = github_post(receiver, {"ref": "x"}, event="push", secret="old " + GH_SECRET)
    assert r.status_code == 202, r.text


def test_bad_github_signatures_are_401_and_store_nothing(receiver: str) -> None:
    body = json.dumps({"action": "opened"}).encode()
    good = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
    base = {"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": str(uuid.uuid4())}
    assert "missing" in refused(receiver, "/webhooks/gh", body, base, 401)
    bad = {**base, "X-Hub-Signature-256": "sha256=" + "0" * 64}
    assert "does not match" in refused(receiver, "/webhooks/gh", body, bad, 401)
    tampered = body.replace(b"opened", b"closed")
    refused(receiver, "/webhooks/gh", tampered, {**base, "X-Hub-Signature-256": good}, 401)
    other_key = "sha256=" + hmac.new(b"not-the-secret", body, hashlib.sha256).hexdigest()
    refused(receiver, "/webhooks/gh", body, {**base, "X-Hub-Signature-256": other_key}, 401)


def test_a_malformed_body_is_400_an_unknown_source_404_and_a_large_body_413(receiver: str) -> None:
    body = b"{not json"
    sig = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1"}
    assert "not valid JSON" in refused(
        receiver, "/webhooks/gh", body, {**headers, "Content-Type": "application/json"}, 400
    )
    no_id = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push"}
    assert "X-GitHub-Delivery" in refused(receiver, "/webhooks/gh", body, no_id, 400)
    assert "no webhook source named 'nope'" in refused(receiver, "/webhooks/nope", b"{}", {}, 404)
    big = b"x" * (get_settings().webhook_max_body_bytes + 1)
    assert "larger than" in refused(receiver, "/webhooks/gh", big, headers, 413)

    # A body that grows past the limit while it streams in (no Content-Length) is cut off too.
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 8192

    before = event_count()
    r = requests.post(f"{receiver}/webhooks/gh", data=chunks(), headers=headers, timeout=10)
    assert r.status_code == 413
    assert event_count() == before


def signed_github(body: bytes, delivery: str | None = None) -> dict[str, str]:
    return {
        "X-Hub-Signature-256": "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "Content-Type": "application/json",
    }


@pytest.mark.parametrize("depth", [65, 30_000])
def test_json_nested_too_deeply_is_400_not_a_server_error(receiver: str, depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    assert "nested deeper than 64" in refused(receiver, "/webhooks/gh", body, signed_github(body), 400)


def test_json_nested_as_deep_as_allowed_is_accepted(receiver: str) -> None:
    body = b"[" * 64 + b"]" * 64
    r = requests.post(f"{receiver}/webhooks/gh", data=body, headers=signed_github(body), timeout=10)
    assert r.status_code == 202, r.text


def test_a_delivery_id_longer_than_the_ledger_keeps_is_refused_not_cut(receiver: str) -> None:
    # Cut to 255 characters, two distinct ids sharing a prefix would be one delivery.
    body = b'{"ref": "x"}'
    prefix = "d" * 255
    msg = refused(receiver, "/webhooks/gh", body, signed_github(body, prefix + "-1"), 400)
    assert "delivery id is longer than 255" in msg
    r = requests.post(f"{receiver}/webhooks/gh", data=body, headers=signed_github(body, prefix), timeout=10)
    assert r.status_code == 202, r.text


# --- Standard Webhooks, signed by the standardwebhooks library ------------------------------------


def std_headers(secret: str, msg_id: str, body: bytes, at: dt.datetime) -> dict[str, str]:
    sig = Webhook(secret).sign(msg_id, at, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": sig}


def test_standard_webhooks_signed_by_the_library_are_accepted_with_either_rotated_secret(
    receiver: str,
) -> None:
    now = dt.datetime.now(dt.UTC)
    for secret in (STD_SECRET_OLD, STD_SECRET_NEW):
        msg_id = "msg_" + uuid.uuid4().hex
        body = json.dumps({"type": "invoice.paid", "data": {"id": msg_id}}).encode()
        r = requests.post(
            f"{receiver}/webhooks/std", data=body, headers=std_headers(secret, msg_id, body, now), timeout=10
        )
        assert r.status_code == 202, r.text
        event = ledger.get_event(r.json()["event_id"])
        assert event is not None
        assert (event.source, event.type, event.payload["data"]["id"]) == ("std", "invoice.paid", msg_id)
        wait_for(lambda e=event.id: runs("on_standard", e) == 1)  # type: ignore[misc]


def test_standard_webhooks_several_signatures_and_unknown_versions(receiver: str) -> None:
    now = dt.datetime.now(dt.UTC)
    msg_id = "msg_" + uuid.uuid4().hex
    body = b'{"type":"user.created","data":{}}'
    good = std_headers(STD_SECRET_NEW, msg_id, body, now)
    foreign = Webhook("whsec_" + "QUJD" * 8).sign(msg_id, now, body.decode())
    # The sender signs with a key we do not know and with ours, and adds a version we ignore.
    header = f"v1a,c29tZXRoaW5n {foreign} {good['webhook-signature']} v2,Zm9v"
    r = requests.post(
        f"{receiver}/webhooks/std", data=body, headers={**good, "webhook-signature": header}, timeout=10
    )
    assert r.status_code == 202, r.text
    # Only unknown versions and foreign keys: refused.
    only_unknown = {**good, "webhook-id": "msg_x", "webhook-signature": f"v1a,c29tZXRoaW5n {foreign}"}
    refused(receiver, "/webhooks/std", body, only_unknown, 401)


def test_standard_webhooks_tampered_or_stale_or_future_are_refused(receiver: str) -> None:
    now = dt.datetime.now(dt.UTC)
    msg_id = "msg_" + uuid.uuid4().hex
    body = b'{"type":"user.created","data":{"n":1}}'
    h = std_headers(STD_SECRET_NEW, msg_id, body, now)
    refused(receiver, "/webhooks/std", body.replace(b"1", b"2"), h, 401)
    refused(receiver, "/webhooks/std", body, {**h, "webhook-id": "msg_other"}, 401)
    for skew in (-301, 301):
        at = now + dt.timedelta(seconds=skew)
        error = refused(receiver, "/webhooks/std", body, std_headers(STD_SECRET_NEW, msg_id, body, at), 401)
        assert "timestamp" in error
    # Within the tolerance either way: accepted.
    at = now + dt.timedelta(seconds=-290)
    ok = requests.post(
        f"{receiver}/webhooks/std",
        data=body,
        headers=std_headers(STD_SECRET_NEW, msg_id, body, at),
        timeout=10,
    )
    assert ok.status_code == 202


# --- the providers' published examples ------------------------------------------------------------


def test_githubs_published_example_passes_the_receiver() -> None:
    with serve_at(time.time) as url:
        headers = {
            "X-Hub-Signature-256": GITHUB_DOC_SIGNATURE,
            "X-GitHub-Event": "ping",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "Content-Type": "text/plain",
        }
        r = requests.post(f"{url}/webhooks/github_doc", data=GITHUB_DOC_BODY, headers=headers, timeout=10)
        assert r.status_code == 202, r.text
        event = ledger.get_event(r.json()["event_id"])
        assert event is not None and event.payload == "Hello, World!"
        one_byte_off = requests.post(
            f"{url}/webhooks/github_doc", data=b"Hello, World?", headers=headers, timeout=10
        )
        assert one_byte_off.status_code == 401


def test_slacks_published_example_passes_the_receiver_within_five_minutes_either_way() -> None:
    headers = {
        "X-Slack-Request-Timestamp": str(SLACK_DOC_TIMESTAMP),
        "X-Slack-Signature": SLACK_DOC_SIGNATURE,
        "Content-Type": "application/x-www-form-urlencoded",
    }
    # Slack asks for 200 whether the request is new (accepted) or a retry (duplicate).
    for skew, status, answer in (
        (-299, 200, "accepted"),
        (299, 200, "duplicate"),
        (-301, 401, None),
        (301, 401, None),
    ):
        with serve_at(lambda s=skew: SLACK_DOC_TIMESTAMP + s) as url:  # type: ignore[misc]
            r = requests.post(f"{url}/webhooks/slack_doc", data=SLACK_DOC_BODY, headers=headers, timeout=10)
            assert r.status_code == status, (skew, r.text)
            assert r.json().get("status") == answer
            if answer == "accepted":
                event = ledger.get_event(r.json()["event_id"])
                assert event is not None
                assert (event.type, event.payload["command"]) == ("slash_command", "/webhook-collect")


def test_slacks_url_verification_challenge_is_answered_and_not_stored() -> None:
    secret = b"8f742231b10e8888abcd99yyyzzz85a5"
    now = int(time.time())
    challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    body = json.dumps(
        {"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": challenge, "type": "url_verification"}
    ).encode()
    sig = "v0=" + hmac.new(secret, f"v0:{now}:".encode() + body, hashlib.sha256).hexdigest()
    before = event_count()
    with serve_at(time.time) as url:
        r = requests.post(
            f"{url}/webhooks/slack_doc",
            data=body,
            headers={
                "X-Slack-Request-Timestamp": str(now),
                "X-Slack-Signature": sig,
                "Content-Type": "application/json",
            },
            timeout=10,
        )
    assert r.status_code == 200
    assert r.json() == {"challenge": challenge}
    assert event_count() == before


# --- load -----------------------------------------------------------------------------------------


def test_a_thousand_github_deliveries_from_twenty_clients_are_each_stored_and_handled_once(
    receiver: str,
) -> None:
    R.delete("test:load:handled")
    run = uuid.uuid4().hex[:8]
    posts = [(n, f"{run}-{n}") for n in range(1000)]

    def post(item: tuple[int, str]) -> int:
        n, delivery = item
        body = json.dumps({"n": n, "ref": "refs/heads/main"}).encode()
        sig = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery}
        session = sessions.setdefault(threading.get_ident(), requests.Session())
        return session.post(
            f"{receiver}/webhooks/gh_load", data=body, headers=headers, timeout=30
        ).status_code

    sessions: dict[int, requests.Session] = {}
    before = event_count("gh_load")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        codes = list(pool.map(post, posts))
    elapsed = time.perf_counter() - t0
    print(f"\n1000 signed deliveries from 20 clients: {1000 / elapsed:.0f} requests/s")
    assert codes.count(202) == 1000
    assert event_count("gh_load") == before + 1000
    wait_for(lambda: R.scard("test:load:handled") == 1000, timeout=120)

    with ThreadPoolExecutor(max_workers=20) as pool:
        again = list(pool.map(post, posts))
    assert again.count(200) == 1000
    assert event_count("gh_load") == before + 1000
    time.sleep(1)
    with get_engine().connect() as conn:
        handled = conn.execute(
            select(func.count(), func.max(EventHandling.attempts))
            .select_from(EventHandling)
            .join(Event, Event.id == EventHandling.event_id)
            .where(Event.source == "gh_load", Event.delivery_id.like(f"{run}-%"))
        ).one()
    assert tuple(handled) == (1000, 1)  # one handling each, each run once


# --- lost work and a broker that is down ----------------------------------------------------------


def test_an_event_never_dispatched_and_a_lost_handling_are_requeued_by_the_sweeper() -> None:
    # A receiver that died between storing and queuing leaves an event never dispatched.
    event_id = ledger.store_event("gh", str(uuid.uuid4()), "push", {"ref": "x"})
    assert event_id is not None
    # A handling whose message was lost (broker emptied) stays queued.
    other = ledger.store_event("gh", str(uuid.uuid4()), "push", {"ref": "y"})
    assert other is not None
    [lost] = ledger.start_dispatch(other, ["handlers_for_tests.on_anything_from_github"])
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with get_engine().begin() as conn:
        conn.execute(update(Event).where(Event.id == event_id).values(received_at=an_hour_ago))
        conn.execute(update(EventHandling).where(EventHandling.id == lost).values(updated_at=an_hour_ago))

    assert requeue_stuck_events() >= 2
    wait_for(lambda: handlings(event_id).get("on_anything_from_github", {}).get("status") == "succeeded")
    wait_for(lambda: handlings(other).get("on_anything_from_github", {}).get("status") == "succeeded")
    assert runs("on_anything_from_github", event_id) == runs("on_anything_from_github", other) == 1


def test_with_the_broker_down_an_event_is_stored_and_the_sweeper_dispatches_it() -> None:
    dead = Celery(broker=f"redis://127.0.0.1:{free_port()}/0")
    dead.conf.broker_connection_retry = False
    dead.conf.broker_connection_timeout = 1

    tried: list[str] = []

    def publish_to_dead_broker(event_id: str) -> None:
        try:
            dead.send_task("integrations.dispatch_event", (event_id,), retry=False)
        except Exception as e:
            tried.append(type(e).__name__)
            raise
        tried.append("published")

    app = create_app(get_webhooks(), publish_to_dead_broker, get_settings().webhook_max_body_bytes)
    with serve(app) as url:
        r = github_post(url, {"ref": "x"}, event="push")
    assert r.status_code == 202
    assert len(tried) == 1 and tried != ["published"]  # the receiver tried once, and it failed
    event_id = r.json()["event_id"]
    with get_engine().connect() as conn:
        dispatched = conn.execute(select(Event.dispatched_at).where(Event.id == event_id)).scalar_one()
    assert dispatched is None and handlings(event_id) == {}

    # Once the broker is back, beat's sweeper finds it (stored longer ago than STUCK_AFTER).
    with get_engine().begin() as conn:
        conn.execute(
            update(Event)
            .where(Event.id == event_id)
            .values(received_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )
    requeue_stuck_events()
    wait_for(lambda: handlings(event_id).get("on_anything_from_github", {}).get("status") == "succeeded")


def test_a_handling_requeued_by_the_sweeper_still_stops_after_its_tries() -> None:
    # Its worker died during its third try (HANDLER_MAX_RETRIES=2: the last one) an hour ago.
    event_id = ledger.store_event("gh", str(uuid.uuid4()), "pull_request", {"fail": 99})
    assert event_id is not None
    [handling] = ledger.start_dispatch(event_id, ["handlers_for_tests.flaky"])
    with get_engine().begin() as conn:
        conn.execute(
            update(EventHandling)
            .where(EventHandling.id == handling)
            .values(status="running", attempts=3, updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )
    requeue_stuck_events()
    wait_for(lambda: handlings(event_id)["flaky"]["status"] == "failed")
    time.sleep(1.5)  # a retry, were there one, would have run by now (backoff 1 s)
    assert handlings(event_id)["flaky"]["attempts"] == 4
    assert runs("flaky", event_id) == 1


# ------------------------------------------------------------------------------------------------
# README claims (issue 10): /healthz, and 503 while the ledger is away
# ------------------------------------------------------------------------------------------------


def test_healthz_answers_ok_without_authentication(receiver: str) -> None:
    r = requests.get(f"{receiver}/healthz", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert requests.post(f"{receiver}/healthz", timeout=10).status_code == 405


def delivery_count(delivery_id: str) -> int:
    with get_engine().connect() as conn:
        q = select(func.count()).select_from(Event).where(Event.delivery_id == delivery_id)
        return int(conn.execute(q).scalar_one())


def test_with_the_ledger_unreachable_the_receiver_answers_503_and_stores_nothing(tmp_path: Path) -> None:
    # `integrations receiver` in a process of its own, its ledger behind a proxy the test cuts.
    db = make_url(os.environ["DATABASE_URL"])
    assert db.host and db.port
    with TcpProxy((db.host, db.port)) as proxy:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = env_with(
            DATABASE_URL=db.set(port=proxy.port).render_as_string(hide_password=False), RECEIVER_PORT=port
        )
        log = tmp_path / "receiver.log"
        with running([str(BIN / "integrations"), "receiver"], env, log):
            procs.wait_for(lambda: requests.get(f"{url}/healthz", timeout=2).ok, 60, "the receiver", log)
            assert github_post(url, {"ref": "a"}, event="push").status_code == 202  # a pooled connection

            proxy.cut()  # the open connection drops, new ones are refused
            delivery = str(uuid.uuid4())
            for _ in range(2):
                r = github_post(url, {"ref": "b"}, event="push", delivery=delivery)
                assert (r.status_code, r.json()) == (503, {"error": "the ledger is unavailable; retry later"})
            assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # alive, though
            assert delivery_count(delivery) == 0

            # The sender retries once the ledger is back: stored now, so it was not before.
            proxy.restore()

            def sender_retries() -> requests.Response | None:
                answer = github_post(url, {"ref": "b"}, event="push", delivery=delivery)
                return None if answer.status_code == 503 else answer

            r = procs.wait_for(sender_retries, 30, "the receiver to reach the ledger again", log)
            assert r.status_code == 202 and r.json()["status"] == "accepted"
    assert delivery_count(delivery) == 1
    assert GH_SECRET not in log.read_text()
