"""Shared state across workers through Redis (upstream pauses, breakers, per-agent limits),
health checks, and replay of failed jobs."""

from __future__ import annotations

import itertools
import json
import math
import time
from typing import Any

import pytest
from conftest import most_in_window
from procs import cli
from sqlalchemy import func, select
from stub import Reply, Stub

from integrations import breaker, coordination
from integrations.errors import InvalidParams, PermanentError, RateLimited, TransientError
from integrations.ledger import jobs as ledger
from integrations.ledger import reads, service_health
from integrations.ledger.db import get_engine
from integrations.ledger.models import HealthCheck as HealthCheckRow
from tasks import call_service, dispatch_deferred, health_check

pytestmark = pytest.mark.usefixtures("worker")


def test_a_429_with_retry_after_pauses_every_call_to_the_service(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=429, headers={"Retry-After": "3"}))
    first = call_service.delay("stub_paused", "echo", {"key": key})
    deadline = time.monotonic() + 10
    # The pause can only start once the worker has read the 429: wait for it, not for the hit
    # (a call sent between the two is not one the pause could have held).
    while coordination.paused_for("stub_paused") <= 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(stub.hits_for(key)) == 1 and coordination.paused_for("stub_paused") > 0
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
    states = [e["state"] for e in reversed(service_health.list_breaker_events("stub_breaker", limit=10))]
    assert states[-5:] == ["open", "half_open", "open", "half_open", "closed"]
    assert breaker.state("stub_breaker") == "closed"
    # Deferrals by the open breaker charge no attempt: every attempt is a call the stub saw.
    attempts = sum(reads.get_job(r.id)["attempts"] for r in failing + waiting)  # type: ignore[index]
    assert attempts == len(hits)


def test_each_agent_gets_its_own_share_of_the_rate(stub: Stub, key: str) -> None:
    alpha, beta = key + "a", key + "b"
    results = [call_service.delay("stub_agents", "echo", {"key": alpha}, agent="alpha") for _ in range(5)]
    results += [call_service.delay("stub_agents", "echo", {"key": beta}, agent="beta") for _ in range(5)]
    for r in results:
        assert r.get(timeout=30)["status"] == "succeeded"
    for k in (alpha, beta):
        times = sorted(h.at for h in stub.hits_for(k))
        assert len(times) == 5
        # 2/s each, burst 1: at most burst + rate = 3 calls of one agent in any second, and the
        # five no faster than the rate allows (less the lateness the limiter absorbs, 0.2 s).
        assert most_in_window(times) <= 3
        assert times[-1] - times[0] >= (5 - 1) / 2 - 0.2
    # The agents ran side by side: beta's first call did not wait behind alpha's last.
    assert min(h.at for h in stub.hits_for(beta)) < max(h.at for h in stub.hits_for(alpha))
    assert reads.get_job(results[0].id)["agent"] == "alpha"  # type: ignore[index]
    with pytest.raises(InvalidParams, match="agent must be"):
        call_service.delay("stub_agents", "echo", {"key": key}, agent="no spaces")


def test_a_failed_job_is_listed_and_replayed_as_a_new_linked_job(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=404))
    failed = call_service.delay("stub", "echo", {"key": key}, agent="replayer")
    with pytest.raises(PermanentError):
        failed.get(timeout=20)
    listing = cli("jobs", "--status", "failed", "--limit", "500")
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if failed.id in line)
    assert "HTTP 404" in row

    out = cli("replay", failed.id, "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and result["job_id"] != failed.id
    new = reads.get_job(result["job_id"])
    assert new is not None and new["replay_of"] == failed.id and new["agent"] == "replayer"
    assert reads.get_job(failed.id)["status"] == "failed"  # type: ignore[index]
    assert len(stub.hits_for(key)) == 2

    again = cli("replay", result["job_id"])
    assert again.returncode == 2
    assert "is succeeded; only failed jobs are replayed" in again.stderr


def test_the_beat_schedule_has_a_health_check_per_service_at_its_interval(app: Any) -> None:
    schedule = app.conf.beat_schedule
    entry = schedule["health-check-stub_health"]
    assert entry["task"] == "integrations.health_check" and entry["args"] == ("stub_health",)
    assert entry["schedule"] == 5.0 and entry["options"] == {"expires": 5.0}
    assert schedule["health-check-stub_health_op"]["schedule"] == 30.0
    assert "health-check-stub" not in schedule  # no health: block, no check


def test_health_checks_are_recorded_shown_and_close_an_open_breaker(stub: Stub, key: str) -> None:
    breaker.reset("stub_health")
    probe = "health-probe"
    # One failing job opens the breaker (threshold 1); a job submitted then is set aside.
    stub.plan(key, Reply(status=500))
    first = call_service.delay("stub_health", "echo", {"key": key})
    with pytest.raises(TransientError):
        first.get(timeout=20)
    assert breaker.state("stub_health") == "open"
    waiting = call_service.delay("stub_health", "echo", {"key": key})
    deadline = time.monotonic() + 10
    while reads.get_job(waiting.id)["status"] != "deferred" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.05)
    assert reads.get_job(waiting.id)["status"] == "deferred"  # type: ignore[index]

    stub.plan(probe, Reply(status=503))
    # Other tests' processes run beat with this services file: count only this test's checks.
    checks_before = len(stub.hits_for(probe))
    assert health_check.apply(("stub_health",)).get() is False
    shown = cli("health")
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("stub_health "))
    assert "unhealthy" in row and " 503 " in row and " open " in row
    assert "stub_health: last error at" in shown.stdout and "HTTP 503" in shown.stdout
    assert breaker.state("stub_health") == "open"

    assert health_check.apply(("stub_health",)).get() is True
    assert breaker.state("stub_health") == "closed"
    event = service_health.list_breaker_events("stub_health", limit=1)[0]
    assert (event["state"], event["reason"]) == ("closed", "health check passed")
    h = ledger.health("stub_health")
    assert h["status"] == "healthy" and h["status_code"] == 200 and h["latency_ms"] > 0
    assert h["last_success_at"] >= h["last_error_at"] and h["last_error"] == "HTTP 503 Service Unavailable"
    row = next(line for line in cli("health").stdout.splitlines() if line.startswith("stub_health "))
    assert " healthy " in row and " closed " in row

    # The parked job is released now that the breaker is closed, instead of waiting out 600 s.
    assert dispatch_deferred.apply().get() >= 1
    assert waiting.get(timeout=20)["status"] == "succeeded"
    assert [h.path for h in stub.hits_for(probe)[checks_before:]] == ["/echo/health-probe"] * 2


def test_a_health_check_can_call_an_operation_with_params(stub: Stub) -> None:
    before = len(stub.hits_for("health-op"))
    assert health_check.apply(("stub_health_op",)).get() is True
    assert len(stub.hits_for("health-op")) == before + 1
    assert ledger.health("stub_health_op")["status"] == "healthy"


@pytest.mark.parametrize(
    ("rate", "burst", "granted"),
    [
        (20, 5, (20, 1)),
        (20, 10, (20, 6)),
        (20, 1, (17.5, 1)),
        (5, 1, (5, 1)),
        (0.5, 1, (0.5, 1)),
        (5000 / 3600, 10, (5000 / 3600, 10)),
    ],
)
def test_the_limiter_plans_its_grants_so_late_calls_still_keep_to_the_limit(
    rate: float, burst: int, granted: tuple[float, int]
) -> None:
    from integrations.config import Rate
    from integrations.coordination import planned

    plan, late = planned(Rate(rate, burst), margin=0.2)
    assert (round(plan.per_second, 3), plan.burst) == (round(granted[0], 3), granted[1])
    # Calls up to `late` after their grant: at most floor((1 + late) * r') + b' in a second.
    assert int((1 + late) * plan.per_second) + plan.burst <= int(burst + rate)


# ------------------------------------------------------------------------------------------------
# README claims (issue 10)
# ------------------------------------------------------------------------------------------------


def test_a_spent_rate_limit_budget_holds_every_call_to_the_service_until_the_reset(
    stub: Stub, key: str
) -> None:
    # GitHub's headers: x-ratelimit-remaining, and x-ratelimit-reset in UTC epoch seconds
    # (https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api).
    reset = math.ceil(time.time()) + 3
    spent = {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    stub.plan(key, Reply(headers=spent))
    first = call_service.delay("stub_paused", "echo", {"key": key}).get(timeout=20)
    assert first["status"] == "succeeded"  # the call that spent the budget still succeeded
    # The pause is in the shared Redis, where every worker's gate reads it.
    assert 1.5 < coordination.paused_for("stub_paused") <= reset - time.time() + 0.1

    others = [call_service.delay("stub_paused", "echo", {"key": key}) for _ in range(4)]
    for r in others:
        assert r.get(timeout=30)["status"] == "succeeded"
    hits = stub.hits_for(key)
    assert len(hits) == 5
    assert all(h.at >= reset - 0.05 for h in hits[1:]), [round(h.at - reset, 2) for h in hits]
    # Held, not failed: no attempt was charged for the wait.
    assert [reads.get_job(r.id)["attempts"] for r in others] == [1] * 4  # type: ignore[index]


def test_health_checks_are_skipped_while_the_service_is_paused(stub: Stub, key: str) -> None:
    # A job's 429 with Retry-After pauses the service; its health check must not spend a call.
    probe = "health-op"
    stub.plan(key, Reply(status=429, headers={"Retry-After": "3"}))
    job = call_service.delay("stub_health_op", "echo", {"key": key})
    deadline = time.monotonic() + 10
    while coordination.paused_for("stub_health_op") <= 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert coordination.paused_for("stub_health_op") > 1
    hits_before, checks_before = len(stub.hits_for(probe)), health_check_count("stub_health_op")

    assert health_check.apply(("stub_health_op",)).get() is None
    assert len(stub.hits_for(probe)) == hits_before
    assert health_check_count("stub_health_op") == checks_before

    # Once the pause is over, the job goes through and the check runs again.
    assert job.get(timeout=30)["status"] == "succeeded"
    assert health_check.apply(("stub_health_op",)).get() is True
    assert len(stub.hits_for(probe)) == hits_before + 1
    assert health_check_count("stub_health_op") == checks_before + 1


def health_check_count(service: str) -> int:
    with get_engine().connect() as conn:
        q = select(func.count()).select_from(HealthCheckRow).where(HealthCheckRow.service == service)
        return int(conn.execute(q).scalar_one())


def test_rate_limited_reaches_the_caller_once_the_retries_are_spent(stub: Stub, key: str) -> None:
    # stub_paused: max_retries 3, so four 429s in a row fail the job.
    stub.plan(key, *[Reply(status=429, headers={"Retry-After": "1"})] * 4)
    r = call_service.delay("stub_paused", "echo", {"key": key})
    with pytest.raises(RateLimited, match="HTTP 429") as e:
        r.get(timeout=60)
    assert type(e.value) is RateLimited
    hits = stub.hits_for(key)
    assert len(hits) == 4
    assert all(b.at - a.at >= 0.95 for a, b in itertools.pairwise(hits))  # each Retry-After obeyed
    job = reads.get_job(r.id)
    assert job is not None and (job["status"], job["attempts"], job["status_code"]) == ("failed", 4, 429)
