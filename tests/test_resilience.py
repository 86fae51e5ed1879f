"""Shared state across workers through Redis: upstream pauses and the circuit breaker."""

from __future__ import annotations

import time

import pytest
from stub import Reply, Stub

from integrations import breaker
from integrations.ledger import jobs as ledger
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")


def test_a_429_with_retry_after_pauses_every_call_to_the_service(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=429, headers={"Retry-After": "3"}))
    first = call_service.delay("stub_paused", "echo", {"key": key})
    deadline = time.monotonic() + 10
    while not stub.hits_for(key) and time.monotonic() < deadline:
        time.sleep(0.02)
    others = [call_service.delay("stub_paused", "echo", {"key": key}) for _ in range(5)]
    for r in [first, *others]:
        assert r.get(timeout=30)["status"] == "succeeded"
    hits = stub.hits_for(key)
    assert len(hits) == 7  # the 429, then six successes
    assert all(h.at - hits[0].at >= 2.95 for h in hits[1:])


def test_the_breaker_opens_lets_only_probes_through_and_closes(stub: Stub, key: str) -> None:
    breaker.reset("stub_breaker")
    stub.plan(key, *[Reply(status=500)] * 4)  # three open the breaker; the first probe fails too
    failing = [call_service.delay("stub_breaker", "echo", {"key": key}) for _ in range(3)]
    deadline = time.monotonic() + 10
    while breaker.state("stub_breaker") != "open" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert breaker.state("stub_breaker") == "open"
    opened = time.time()
    waiting = [call_service.delay("stub_breaker", "echo", {"key": key}) for _ in range(5)]
    for r in failing + waiting:
        assert r.get(timeout=40)["status"] == "succeeded"
    hits = stub.hits_for(key)
    after_open = [h for h in hits if h.at >= opened]
    # While open, only single probes reach the stub, each after the reset timeout (1.5 s).
    assert after_open[0].at - opened >= 1.4
    assert after_open[1].at - after_open[0].at >= 1.4
    states = [e["state"] for e in reversed(ledger.list_breaker_events("stub_breaker", limit=10))]
    assert states[-5:] == ["open", "half_open", "open", "half_open", "closed"]
    assert breaker.state("stub_breaker") == "closed"
    # Deferrals by the open breaker charge no attempt: every attempt is a call the stub saw.
    attempts = sum(ledger.get_job(r.id)["attempts"] for r in failing + waiting)  # type: ignore[index]
    assert attempts == len(hits)
