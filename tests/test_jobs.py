"""The job path end to end: delay() -> ledger row -> real worker -> loopback upstream -> ledger."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from email.utils import format_datetime
from typing import Any

import pytest
from celery.signals import before_task_publish, task_postrun
from conftest import TOKEN
from sqlalchemy import func, select, update
from stub import Reply, Stub

from integrations.errors import (
    InvalidParams,
    PermanentError,
    TransientError,
    UnknownOperation,
    UnknownService,
)
from integrations.ledger import jobs as ledger
from integrations.ledger import reads
from integrations.ledger.db import get_engine
from integrations.ledger.models import Job, JobAttempt
from tasks import call_service, requeue_stuck_jobs

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """Every message published while the test runs: its headers and body, as the broker sees them."""
    seen: list[dict[str, Any]] = []

    def record(sender: str, body: Any, headers: dict[str, Any], **_: Any) -> None:
        seen.append({"task": sender, "headers": headers, "body": body})

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def job_count() -> int:
    with get_engine().connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Job)).scalar_one())


def attempts_of(job_id: str) -> list[dict[str, Any]]:
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None
    return list(job["attempts_log"])


def test_delay_returns_the_result_and_the_ledger_keeps_the_life(stub: Stub, key: str) -> None:
    r = call_service.delay("stub", "echo", {"key": key, "n": "5"}, idempotency_key=key)
    out = r.get(timeout=20)
    assert out["job_id"] == r.id
    assert out["status"] == "succeeded"
    assert out["status_code"] == 200
    assert out["data"]["query"] == {"n": ["5"]}  # "5" was coerced to the declared int
    job = reads.get_job(r.id, with_attempts=True)
    assert job is not None
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["status_code"] == 200
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["latency_ms"] > 0
    assert [a["outcome"] for a in job["attempts_log"]] == ["succeeded"]


def test_the_broker_carries_only_the_job_id(published: list[dict[str, Any]], key: str) -> None:
    r = call_service.delay("stub", "create", {"key": key, "title": "very-private-title"})
    r.get(timeout=20)
    (msg,) = published
    assert msg["task"] == "integrations.call.stub"
    assert list(msg["body"][0]) == [r.id] and msg["body"][1] == {}
    raw = json.dumps(msg, default=str)
    assert "very-private-title" not in raw and TOKEN not in raw and key not in raw


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("nosuch", "echo", {}), UnknownService, "unknown service (known: "),
        (
            ("stub", "nosuch", {}),
            UnknownOperation,
            "service 'stub' has no such operation (it has: create, echo)",
        ),
        (("stub", "echo", {}), InvalidParams, "stub.echo: key: required"),
        (
            ("stub", "echo", {"key": "k", "n": "five"}),
            InvalidParams,
            "stub.echo: n: must be an integer",
        ),
        (
            ("stub", "echo", {"key": "k", "extra": 1}),
            InvalidParams,
            "extra: not a parameter of this operation",
        ),
        (("stub", "echo", ["key"]), InvalidParams, "params must be a mapping"),
    ],
)
def test_bad_input_raises_in_the_caller_and_writes_nothing(
    published: list[dict[str, Any]], args: tuple[Any, ...], error: type, message: str
) -> None:
    before = job_count()
    with pytest.raises(error) as e:
        call_service.delay(*args)
    assert message in str(e.value)
    assert job_count() == before
    assert published == []


def test_the_same_idempotency_key_never_calls_twice(stub: Stub, key: str) -> None:
    first = call_service.delay("stub", "echo", {"key": key}, idempotency_key="k-" + key)
    first.get(timeout=20)
    again = call_service.delay("stub", "echo", {"key": key}, idempotency_key="k-" + key)
    assert again.id == first.id
    assert again.get(timeout=20)["status"] == "succeeded"
    assert len(stub.hits_for(key)) == 1


def test_concurrent_submits_with_one_key_make_one_job(stub: Stub, key: str) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait(timeout=10)
        ids.append(call_service.delay("stub", "echo", {"key": key}, idempotency_key="c-" + key).id)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(set(ids)) == 1 and len(ids) == 8
    call_service.AsyncResult(ids[0]).get(timeout=20)
    assert len(stub.hits_for(key)) == 1


def test_5xx_and_dropped_connections_are_retried_with_backoff(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=502), Reply(drop=True))
    out = call_service.delay("stub", "echo", {"key": key}).get(timeout=30)
    assert out["status"] == "succeeded" and out["attempts"] == 3
    log = attempts_of(out["job_id"])
    assert [(a["outcome"], a["status_code"]) for a in log] == [
        ("retrying", 502),
        ("retrying", None),
        ("succeeded", 200),
    ]
    assert "connection" in log[1]["error"]


def test_every_attempt_sends_the_job_id_as_idempotency_key(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=502))
    r = call_service.delay("stub", "create", {"key": key, "title": "t"})
    assert r.get(timeout=20)["attempts"] == 2
    assert [h.headers["idempotency-key"] for h in stub.hits_for(key)] == [r.id, r.id]


def test_a_slow_upstream_times_out_and_is_retried(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(delay=2.5))
    out = call_service.delay("stub", "echo", {"key": key}).get(timeout=30)
    log = attempts_of(out["job_id"])
    assert [a["outcome"] for a in log] == ["retrying", "succeeded"]
    assert "did not answer within 2.0s" in log[0]["error"]


def test_4xx_fails_at_once(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=404, body={"message": "Not Found"}))
    r = call_service.delay("stub", "echo", {"key": key})
    with pytest.raises(PermanentError, match="HTTP 404"):
        r.get(timeout=20)
    job = reads.get_job(r.id, with_attempts=True)
    assert job is not None
    assert (job["status"], job["attempts"], job["status_code"]) == ("failed", 1, 404)
    assert job["error"] == "HTTP 404 Not Found"
    assert '"Not Found"' in job["response_excerpt"]
    assert len(stub.hits_for(key)) == 1


def test_retries_run_out_and_the_job_fails_with_every_attempt(stub: Stub, key: str) -> None:
    stub.plan(key, *[Reply(status=500)] * 4)
    r = call_service.delay("stub", "echo", {"key": key})
    with pytest.raises(TransientError, match="HTTP 500"):
        r.get(timeout=40)
    log = attempts_of(r.id)
    assert [a["outcome"] for a in log] == ["retrying", "retrying", "retrying", "failed"]
    assert len(stub.hits_for(key)) == 4  # max_retries: 3
    assert reads.get_job(r.id)["status"] == "failed"  # type: ignore[index]


@pytest.mark.parametrize("form", ["seconds", "http-date"])
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(stub: Stub, key: str, form: str, status: int) -> None:
    # An HTTP-date has whole seconds: ask for 3 s so the wait is at least 2.
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    value = "2" if form == "seconds" else format_datetime(when, usegmt=True)
    stub.plan(key, Reply(status=status, headers={"Retry-After": value}))
    out = call_service.delay("stub", "echo", {"key": key}).get(timeout=30)
    first, second = stub.hits_for(key)
    assert second.at - first.at >= 1.95
    job = reads.get_job(out["job_id"], with_attempts=True)
    assert job is not None and job["attempts_log"][0]["status_code"] == status


def test_a_refused_address_fails_without_reaching_the_host(stub: Stub, key: str) -> None:
    r = call_service.delay("guarded", "echo", {"key": key})
    with pytest.raises(PermanentError, match="not a public address"):
        r.get(timeout=20)
    assert stub.hits_for(key) == []


def test_ledger_bodies_are_bounded_and_hold_no_secret(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(body={"blob": "y" * 5000}))
    out = call_service.delay("stub_apikey", "echo", {"key": key}).get(timeout=20)
    assert len(out["data"]["blob"]) == 5000  # the caller gets the whole body
    job = reads.get_job(out["job_id"], with_attempts=True)
    assert job is not None
    assert len(job["response_excerpt"].encode()) <= 512
    assert TOKEN not in json.dumps(job, default=str)


def test_a_rate_limit_spaces_the_calls(stub: Stub, key: str) -> None:
    results = [call_service.delay("stub_limited", "echo", {"key": key}) for _ in range(8)]
    for r in results:
        r.get(timeout=30)
    times = sorted(h.at for h in stub.hits_for(key))
    # 5/s: eight calls need at least 7 intervals of 0.2 s.
    assert times[-1] - times[0] >= 1.2


def test_celery_rate_limit_annotations_stand_in_only_without_a_shared_redis(app: Any, tmp_path: Any) -> None:
    from integrations.config import Settings
    from integrations.services import get_services
    from tasks.celeryapp import rate_limit_annotations

    assert app.conf.task_annotations == {}  # the global limiter in Redis holds for every worker
    annotations = rate_limit_annotations(
        Settings(broker_url="filesystem://localhost/", var_dir=tmp_path), get_services()
    )
    assert annotations["integrations.call.stub_limited"] == {"rate_limit": "5/s"}
    assert annotations["integrations.call.stub_global"] == {"rate_limit": "20/s"}
    assert "integrations.call.stub" not in annotations


def test_a_redelivered_message_does_not_run_the_job_again(app: Any, stub: Stub, key: str) -> None:
    r = call_service.delay("stub", "echo", {"key": key})
    first = r.get(timeout=20)
    ran: list[str] = []

    def finished(task_id: str, state: str, **_: Any) -> None:
        if task_id == r.id:
            ran.append(state)

    task_postrun.connect(finished, weak=False)
    try:
        app.tasks["integrations.call.stub"].apply_async((r.id,), task_id=r.id)
        deadline = time.monotonic() + 20  # until the worker has taken the duplicate and let it go
        while not ran and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        task_postrun.disconnect(finished)
    assert ran == ["IGNORED"]
    assert len(stub.hits_for(key)) == 1
    assert r.get(timeout=5) == first
    assert reads.get_job(r.id)["attempts"] == 1  # type: ignore[index]


def test_the_sweeper_requeues_a_job_whose_message_was_lost(stub: Stub, key: str) -> None:
    job_id, created = ledger.create_job("stub", "echo", {"key": key}, None)
    assert created
    with get_engine().begin() as conn:  # as if submitted long ago and its message lost
        conn.execute(
            update(ledger.jobs)
            .where(ledger.jobs.c.id == job_id)
            .values(updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )
    assert requeue_stuck_jobs.apply().get() >= 1
    assert call_service.AsyncResult(job_id).get(timeout=20)["status"] == "succeeded"
    assert len(stub.hits_for(key)) == 1


def test_an_attempt_whose_worker_was_lost_is_recorded_lost_when_the_sweeper_requeues_it(
    stub: Stub, key: str
) -> None:
    job_id, _ = ledger.create_job("stub", "echo", {"key": key}, None)
    assert ledger.claim(job_id) is not None  # a worker took it, then died before recording
    with get_engine().begin() as conn:
        conn.execute(
            update(ledger.jobs)
            .where(ledger.jobs.c.id == job_id)
            .values(updated_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )
    assert requeue_stuck_jobs.apply().get() >= 1
    assert call_service.AsyncResult(job_id).get(timeout=20)["status"] == "succeeded"
    log = attempts_of(job_id)
    assert [(a["number"], a["outcome"]) for a in log] == [(1, "lost"), (2, "succeeded")]
    assert "worker running it was lost" in log[0]["error"]


def test_every_job_counts_exactly_its_attempt_rows_numbered_from_one(stub: Stub, key: str) -> None:
    # One job with a retry of each kind, so the invariant is checked on at least these.
    stub.plan(key, Reply(status=500), Reply(status=429, headers={"Retry-After": "1"}))
    mine = call_service.delay("stub", "echo", {"key": key}).get(timeout=30)["job_id"]
    with get_engine().connect() as conn:
        counted = dict(conn.execute(select(Job.id, Job.attempts).where(Job.status != "running")).all())
        numbers: dict[str, list[int]] = {}
        for job_id, number in conn.execute(
            select(JobAttempt.job_id, JobAttempt.number).order_by(JobAttempt.number)
        ):
            numbers.setdefault(job_id, []).append(number)
    assert counted[mine] == 3  # and every other job the session has run so far
    wrong = {
        job_id: (attempts, numbers.get(job_id, []))
        for job_id, attempts in counted.items()
        if numbers.get(job_id, []) != list(range(1, attempts + 1))
    }
    assert wrong == {}
