"""Outgoing webhooks: endpoints from the CLI, deliveries signed per Standard Webhooks (checked by
the standardwebhooks library) to a real loopback server, and the retry schedule kept in the
ledger. The tests drive beat's dispatcher themselves (WEBHOOK_RETRY_SCHEDULE=0,1,1)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.signals import before_task_publish
from conftest import free_port
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook
from stub import Hit, Reply, Stub

from integrations.ledger import deliveries as ledger
from integrations.ledger.db import get_engine
from integrations.ledger.models import Delivery, Endpoint
from integrations.webhooks import outgoing
from tasks import dispatch_deliveries, publish_now, publish_webhook
from tasks.cli import main as cli

pytestmark = pytest.mark.usefixtures("worker")


def add_endpoint(url: str, events: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """``integrations endpoints add``: returns the endpoint id and the secret it printed once."""
    assert cli(["endpoints", "add", url, "--events", events]) == 0
    out = capsys.readouterr().out.split()
    return out[0], out[2]


def wait_for(check: Callable[[], bool], timeout: float = 20.0, drive: bool = False) -> None:
    """Wait for ``check``; with ``drive``, run beat's dispatcher every 0.2 s meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        if drive:
            dispatch_deliveries()
        time.sleep(0.2)


def delivery(delivery_id: str) -> dict[str, Any]:
    d = ledger.get_delivery(delivery_id)
    assert d is not None
    return d


def settled(delivery_id: str) -> Callable[[], bool]:
    return lambda: delivery(delivery_id)["status"] in ("succeeded", "failed")


def verified(secret: str, hit: Hit) -> Any:
    """The payload, after the standardwebhooks library accepted the signature."""
    return Webhook(secret).verify(hit.body, hit.headers)


def test_endpoints_cli_add_list_disable_and_the_secret_is_shown_once(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint_id, secret = add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    assert secret.startswith("whsec_")
    assert cli(["endpoints", "list"]) == 0
    listed = capsys.readouterr().out
    assert endpoint_id in listed and secret not in listed
    assert cli(["endpoints", "disable", endpoint_id]) == 0
    capsys.readouterr()
    row = next(e for e in ledger.list_endpoints() if e["id"] == endpoint_id)
    assert (row["enabled"], row["disabled_reason"]) == (False, "disabled by an operator")
    assert publish_webhook.delay(f"{key}.created", {}).get(timeout=10) == []
    assert cli(["endpoints", "add", "ftp://example.com/x"]) == 2
    assert "http:// or https://" in capsys.readouterr().err
    assert cli(["endpoints", "disable", "ep_nope"]) == 2


def test_an_event_goes_signed_to_the_subscribed_endpoints_only(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, secret = add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    add_endpoint(f"{stub.url}/echo/{key}x", f"{key}.deleted", capsys)
    ids = publish_webhook.delay(f"{key}.created", {"order": 42}).get(timeout=10)
    assert len(ids) == 1
    wait_for(settled(ids[0]))
    assert delivery(ids[0])["status"] == "succeeded"
    [hit] = stub.hits_for(key)
    assert hit.headers["webhook-id"] == ids[0]
    assert hit.headers["content-type"] == "application/json"
    payload = verified(secret, hit)
    assert (payload["type"], payload["data"]) == (f"{key}.created", {"order": 42})
    assert stub.hits_for(key + "x") == []
    [attempt] = ledger.attempts_of(ids[0])
    assert (attempt["number"], attempt["ok"], attempt["status_code"]) == (1, True, 200)
    assert attempt["response_excerpt"].startswith("{")

    # The library function does the same.
    [again] = publish_now(f"{key}.updated", [1, 2])
    wait_for(settled(again))
    assert verified(secret, stub.hits_for(key)[-1])["data"] == [1, 2]


def test_a_receiver_down_then_500_then_200_gets_it_on_the_scheduled_try(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    _, secret = add_endpoint(f"http://127.0.0.1:{port}/echo/{key}", f"{key}.*", capsys)
    [delivery_id] = publish_webhook.delay(f"{key}.created", {"n": 1}).get(timeout=10)
    wait_for(lambda: delivery(delivery_id)["attempts"] == 1 and delivery(delivery_id)["status"] == "pending")
    assert "connection refused" in delivery(delivery_id)["last_error"]

    receiver = Stub(port=port).start()
    try:
        receiver.plan(key, Reply(500))
        # Due again after the schedule's step; beat's dispatcher queues it once, not on every tick.
        wait_for(lambda: delivery(delivery_id)["next_attempt_at"] <= dt.datetime.now(dt.UTC))
        assert dispatch_deliveries() == 1
        assert dispatch_deliveries() == 0
        wait_for(settled(delivery_id), drive=True)
        hits = receiver.hits_for(key)
    finally:
        receiver.stop()
    assert delivery(delivery_id)["status"] == "succeeded"
    tries = ledger.attempts_of(delivery_id)
    assert [(a["number"], a["ok"], a["status_code"]) for a in tries] == [
        (1, False, None),
        (2, False, 500),
        (3, True, 200),
    ]
    assert "connection refused" in tries[0]["error"] and tries[1]["error"] == "HTTP 500 Internal Server Error"
    # Each try waited for its step of the schedule (1 s), and kept the same webhook-id.
    assert all(b["at"] - a["at"] >= dt.timedelta(seconds=0.9) for a, b in itertools.pairwise(tries))
    assert [h.headers["webhook-id"] for h in hits] == [delivery_id, delivery_id]
    assert all(verified(secret, h)["data"] == {"n": 1} for h in hits)


def test_after_the_last_try_the_delivery_has_failed_and_redeliver_tries_once_more(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint_id, _ = add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    stub.plan(key, Reply(500), Reply(503), Reply(500))
    [delivery_id] = publish_webhook.delay(f"{key}.created", {}).get(timeout=10)
    wait_for(settled(delivery_id), drive=True)
    assert (delivery(delivery_id)["status"], delivery(delivery_id)["attempts"]) == ("failed", 3)

    assert cli(["deliveries", "--endpoint", endpoint_id, "--status", "failed"]) == 0
    assert delivery_id in capsys.readouterr().out
    assert cli(["redeliver", delivery_id]) == 0
    wait_for(settled(delivery_id))
    assert (delivery(delivery_id)["status"], delivery(delivery_id)["attempts"]) == ("succeeded", 4)
    assert {h.headers["webhook-id"] for h in stub.hits_for(key)} == {delivery_id}
    assert cli(["delivery", delivery_id]) == 0
    shown = capsys.readouterr().out
    assert "HTTP 503 Service Unavailable" in shown and shown.count("True") == 1
    assert cli(["redeliver", "msg_nope"]) == 2
    assert "no delivery with id msg_nope" in capsys.readouterr().err


def test_410_gone_disables_the_endpoint(stub: Stub, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint_id, _ = add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    stub.plan(key, Reply(410))
    [delivery_id] = publish_webhook.delay(f"{key}.created", {}).get(timeout=10)
    wait_for(settled(delivery_id))
    assert (delivery(delivery_id)["status"], delivery(delivery_id)["attempts"]) == ("failed", 1)
    row = next(e for e in ledger.list_endpoints() if e["id"] == endpoint_id)
    assert (row["enabled"], row["disabled_reason"]) == (False, "the endpoint answered 410 Gone")
    assert publish_webhook.delay(f"{key}.created", {}).get(timeout=10) == []


@pytest.mark.parametrize("status", [429, 502, 504])
def test_retry_after_is_honoured_for_429_502_and_504(
    stub: Stub, key: str, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    stub.plan(key, Reply(status, headers={"Retry-After": "3"}))
    [delivery_id] = publish_webhook.delay(f"{key}.created", {}).get(timeout=10)
    wait_for(lambda: delivery(delivery_id)["attempts"] == 1 and delivery(delivery_id)["status"] == "pending")
    first = ledger.attempts_of(delivery_id)[0]
    wait = delivery(delivery_id)["next_attempt_at"] - first["at"]
    assert dt.timedelta(seconds=2.5) < wait < dt.timedelta(seconds=3.5)  # the schedule's step is 1 s
    wait_for(settled(delivery_id), drive=True)
    hits = stub.hits_for(key)
    assert delivery(delivery_id)["status"] == "succeeded"
    assert hits[1].at - hits[0].at >= 2.9


def test_a_redirect_and_a_timeout_are_failures(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    stub.plan(key, Reply(302, headers={"Location": f"{stub.url}/echo/{key}-moved"}), Reply(delay=3))
    [delivery_id] = publish_webhook.delay(f"{key}.created", {}).get(timeout=10)
    wait_for(settled(delivery_id), drive=True)
    tries = ledger.attempts_of(delivery_id)
    assert [(a["ok"], a["status_code"]) for a in tries] == [(False, 302), (False, None), (True, 200)]
    assert "did not answer within 2.0s" in tries[1]["error"]
    assert stub.hits_for(f"{key}-moved") == []  # the redirect was not followed


def test_an_endpoint_failing_for_too_long_is_disabled_but_a_quiet_one_is_not(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    six_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=6)
    quiet_id, _ = add_endpoint(f"{stub.url}/echo/{key}q", f"{key}q.*", capsys)
    failing_id, _ = add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    with get_engine().begin() as conn:
        # Both added six days ago; one has been failing since, the other had nothing to receive.
        conn.execute(update(Endpoint).where(Endpoint.id == quiet_id).values(created_at=six_days_ago))
        conn.execute(
            update(Endpoint)
            .where(Endpoint.id == failing_id)
            .values(created_at=six_days_ago, failing_since=six_days_ago)
        )
    stub.plan(key, Reply(500))
    stub.plan(key + "q", Reply(500))
    [failing] = publish_webhook.delay(f"{key}.created", {}).get(timeout=10)
    [quiet] = publish_webhook.delay(f"{key}q.created", {}).get(timeout=10)
    wait_for(settled(failing))
    wait_for(lambda: delivery(quiet)["attempts"] == 1 and delivery(quiet)["status"] == "pending")
    assert (delivery(failing)["status"], delivery(failing)["attempts"]) == ("failed", 1)
    rows = {e["id"]: e for e in ledger.list_endpoints()}
    assert (
        rows[failing_id]["enabled"] is False
        and "no successful delivery" in rows[failing_id]["disabled_reason"]
    )
    # The quiet one failed once: it keeps its schedule, and its failing time starts now.
    assert rows[quiet_id]["enabled"] is True and rows[quiet_id]["failing_since"] is not None
    wait_for(settled(quiet), drive=True)
    assert delivery(quiet)["status"] == "succeeded"
    assert next(e for e in ledger.list_endpoints() if e["id"] == quiet_id)["failing_since"] is None

    # Enabled again by an operator, the endpoint's failing time starts over.
    assert cli(["endpoints", "enable", failing_id]) == 0
    capsys.readouterr()
    assert next(e for e in ledger.list_endpoints() if e["id"] == failing_id)["failing_since"] is None


def test_the_ssrf_guard_refuses_a_private_address_outside_the_allow_list_at_delivery_too(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `endpoints add` refuses it (tests/test_security.py); an endpoint stored before that check,
    # or whose name resolves elsewhere since, is still refused on every try.
    assert cli(["endpoints", "add", "http://169.254.169.254/latest/meta-data", "--events", "*"]) == 2
    ledger.add_endpoint("http://169.254.169.254/latest/meta-data", "whsec_" + "QUJDRA==", [f"{key}.*"], None)
    [delivery_id] = publish_webhook.delay(f"{key}.created", {}).get(timeout=10)
    wait_for(lambda: delivery(delivery_id)["status"] == "pending" and delivery(delivery_id)["attempts"] == 1)
    assert "not a public address" in delivery(delivery_id)["last_error"]


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def record(sender: str, body: Any, headers: dict[str, Any], **_: Any) -> None:
        seen.append({"task": sender, "body": body})

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def test_the_broker_carries_ids_never_a_secret(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str], published: list[dict[str, Any]]
) -> None:
    _, secret = add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    [delivery_id] = publish_now(f"{key}.created", {"x": 1})
    wait_for(settled(delivery_id))
    assert any(m["task"] == "integrations.deliver_webhook" for m in published)
    assert secret not in json.dumps([m["body"] for m in published], default=str)


def test_a_queued_try_no_worker_took_is_queued_again_once_a_minute_has_passed(
    stub: Stub, key: str, capsys: pytest.CaptureFixture[str], published: list[dict[str, Any]]
) -> None:
    add_endpoint(f"{stub.url}/echo/{key}", f"{key}.*", capsys)
    # The library's publish stores the delivery as queued at once; its message is lost here
    # (never sent), as when a broker loses it or every worker is far behind.
    [delivery_id] = outgoing.publish(f"{key}.created", {"n": 1})

    def queued_by_beat() -> int:
        """Run beat's dispatcher once; how many times it queued this delivery."""
        published.clear()
        dispatch_deliveries()
        mine = [m for m in published if m["task"] == "integrations.deliver_webhook"]
        return sum(list(m["body"][0]) == [delivery_id] for m in mine)

    def queued_ago(seconds: float) -> None:
        with get_engine().begin() as conn:
            conn.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(queued_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds))
            )

    assert queued_by_beat() == 0  # queued just now: not again
    queued_ago(50)
    assert queued_by_beat() == 0  # within the minute: not again
    assert stub.hits_for(key) == []
    queued_ago(61)
    assert queued_by_beat() == 1  # a minute without a worker taking it: queued again, once
    assert queued_by_beat() == 0
    wait_for(settled(delivery_id))
    assert (delivery(delivery_id)["status"], delivery(delivery_id)["attempts"]) == ("succeeded", 1)
    [hit] = stub.hits_for(key)
    assert hit.headers["webhook-id"] == delivery_id
