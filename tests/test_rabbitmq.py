"""RabbitMQ as the broker (issue 15): the job path, incoming webhooks to handlers and outgoing
deliveries, through real processes on the machine's RabbitMQ.

The module runs one stack in a RabbitMQ virtual host of its own (made before, deleted after):
a prefork worker node, real beat, the webhook receiver, and a ``redis-server`` of its own for
what RabbitMQ does not keep (coordination: limits, pauses, breakers, worker liveness; and task
results, the default beside an ``amqp://`` broker). Agents submit from other processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import rabbitmq
import requests
from conftest import DATABASE_URL, free_port, most_in_window
from procs import BIN, cli, env_with, python, running, wait_for
from standardwebhooks.webhooks import Webhook
from stub import Reply, Stub
from test_faults import redis_server, submit, worker_nodes
from test_webhooks_in import github_post, handlings, runs

from integrations.ledger import deliveries, reads
from integrations.ledger.models import JobStatus

SERVICES = Path(__file__).resolve().parent / "services.yaml"


@dataclass
class Stack:
    vhost: str
    env: dict[str, str]
    receiver: str
    logs: list[Path]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("rabbit")
    port = free_port()
    with contextlib.ExitStack() as s:
        server = s.enter_context(redis_server(tmp))
        vhost, url = s.enter_context(rabbitmq.vhost())
        env = env_with(
            BROKER_URL=url,
            COORDINATION_URL=server.url,
            RESULT_BACKEND=None,  # the default beside RabbitMQ: the coordination Redis
            DATABASE_URL=DATABASE_URL,
            SERVICES_FILE=SERVICES,
            RECEIVER_HOST="127.0.0.1",
            RECEIVER_PORT=port,
        )
        s.enter_context(worker_nodes(["rabbit"], env, tmp, ["-P", "prefork", "-c", "4"]))
        beat_log = tmp / "beat.log"
        cmd = [
            str(BIN / "celery"),
            "-A",
            "tasks",
            "beat",
            f"--schedule={tmp / 'schedule'}",
            "--loglevel=INFO",
        ]
        s.enter_context(running(cmd, env, beat_log))
        receiver_log = tmp / "receiver.log"
        s.enter_context(running([str(BIN / "integrations"), "receiver"], env, receiver_log))
        receiver = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(f"{receiver}/healthz", timeout=2).ok, 60, "the receiver", receiver_log)
        yield Stack(vhost, env, receiver, [tmp / "worker-rabbit.log", beat_log, receiver_log])


RESULTS = """
import json
from tasks import call_service
print(json.dumps([call_service.AsyncResult(i).get(timeout=60) for i in {ids!r}]))
"""


def results(ids: list[str], env: dict[str, str]) -> list[dict[str, object]]:
    """What the agent gets back (``AsyncResult.get``), in another process."""
    out = python(RESULTS.format(ids=ids), env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got: list[dict[str, object]] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def test_jobs_run_on_quorum_queues_and_the_agent_gets_their_results(
    stack: Stack, stub: Stub, key: str
) -> None:
    ids = submit("stub", key, 20, stack.env)
    got = results(ids, stack.env)
    assert [r["status"] for r in got] == ["succeeded"] * 20
    assert {r["job_id"] for r in got} == set(ids)
    assert len(stub.hits_for(key)) == 20
    queues = rabbitmq.queues(stack.vhost)
    assert queues["integrations"]["type"] == queues["integrations.maintenance"]["type"] == "quorum"
    # Celery's native delayed delivery: 28 levels of delay queues, one per bit of the countdown.
    assert {f"celery_delayed_{n}" for n in range(28)} <= set(queues)


def received_at(log: Path, task_id: str) -> list[float]:
    """When the worker's log says it received ``task_id``'s messages (epoch seconds)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if f"[{task_id}] received" in line:
            stamp = dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            found.append(stamp.timestamp())
    return found


def test_a_retry_after_waits_in_rabbitmq_not_in_the_worker(stack: Stack, stub: Stub, key: str) -> None:
    stub.plan(key, Reply(429, headers={"Retry-After": "3"}))
    [job_id] = submit("stub", key, 1, stack.env)
    [result] = results([job_id], stack.env)
    first, second = stub.hits_for(key)
    assert result["status"] == "succeeded" and result["attempts"] == 2
    assert second.at - first.done >= 3 - 0.1
    # The retry's message reached the worker when it was due: it waited in RabbitMQ's delay
    # queues, not in the worker's memory with an ETA (which holds a prefetch slot meanwhile).
    _, retried = received_at(stack.logs[0], job_id)
    assert retried >= first.done + 3 - 1.1  # native delays count whole seconds


def test_countdowns_under_a_second_are_kept_too(stack: Stack, stub: Stub, key: str) -> None:
    # stub_limited: 5 calls a second. The limiter defers most of these by fractions of a second
    # (native delayed delivery counts whole seconds and refuses less than one).
    n = 12
    ids = submit("stub_limited", key, n, stack.env)
    got = results(ids, stack.env)
    assert [r["status"] for r in got] == ["succeeded"] * n
    times = sorted(h.at for h in stub.hits_for(key))
    assert len(times) == n
    assert most_in_window(times) <= 5 + 1  # rate + burst in any one-second window
    assert times[-1] - times[0] >= (n - 2) / 5 - 0.2


SUBMIT_REFUSED = """
import json
from integrations.errors import SubmitError
from tasks import call_service
out = []
for _ in range(5):
    try:
        out.append(["queued", call_service.delay("stub", "echo", {{"key": {key!r}}}).id])
    except SubmitError as e:
        out.append(["refused", str(e)])
print(json.dumps(out))
"""


def test_a_message_rabbitmq_refuses_fails_the_submit_and_its_job(tmp_path: Path, key: str) -> None:
    # Publisher confirms: a queue at its length limit refuses (nacks) the message, and the agent
    # hears of it at once instead of a job that waits for nothing. No worker runs here.
    with rabbitmq.vhost() as (vhost, url), redis_server(tmp_path) as server:
        env = env_with(
            BROKER_URL=url, COORDINATION_URL=server.url, RESULT_BACKEND=None, SERVICES_FILE=SERVICES
        )
        rabbitmq.set_policy(vhost, "full", "^integrations$", {"max-length": 1, "overflow": "reject-publish"})
        time.sleep(1)  # the policy reaches the queue
        out = python(SUBMIT_REFUSED.format(key=key), env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    refused = [text for what, text in outcomes if what == "refused"]
    assert refused, outcomes
    for text in refused:
        assert "could not queue the job: broker unavailable" in text and "was not run" in text
        [job_id] = re.findall(r"job ([0-9a-f-]{36}) was not run", text)
        job = reads.get_job(job_id)
        assert job is not None and job["status"] == JobStatus.FAILED
    for what, job_id in outcomes:
        if what == "queued":
            job = reads.get_job(job_id)
            assert job is not None and job["status"] == JobStatus.QUEUED


def test_an_incoming_webhook_reaches_its_handlers_and_a_failing_one_is_retried(stack: Stack) -> None:
    r = github_post(stack.receiver, {"action": "opened", "fail": 1})
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]

    def settled() -> bool:
        h = handlings(event_id)
        return len(h) == 3 and all(x["status"] == "succeeded" for x in h.values())

    wait_for(settled, 60, "every handler to succeed", stack.logs[0])
    h = handlings(event_id)
    assert h["flaky"]["attempts"] == 2  # failed once, retried on its own
    assert h["on_pull_request"]["attempts"] == h["on_anything_from_github"]["attempts"] == 1
    assert runs("on_pull_request", event_id) == runs("on_anything_from_github", event_id) == 1


PUBLISH = """
import json
from tasks import publish_webhook
print(json.dumps(publish_webhook.delay({event_type!r}, {{"order": 7}}).get(timeout=60)))
"""


def test_an_outgoing_delivery_is_retried_on_schedule_by_beat_until_it_succeeds(
    stack: Stack, stub: Stub, key: str
) -> None:
    added = cli("endpoints", "add", f"{stub.url}/echo/{key}", "--events", f"{key}.*", env=stack.env)
    assert added.returncode == 0, added.stderr
    secret = added.stdout.split()[2]
    stub.plan(key, Reply(500))
    out = python(PUBLISH.format(event_type=f"{key}.created"), stack.env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    [delivery_id] = json.loads(out.stdout.strip().splitlines()[-1])

    def settled() -> bool:
        d = deliveries.get_delivery(delivery_id)
        return d is not None and d["status"] in ("succeeded", "failed")

    # WEBHOOK_RETRY_SCHEDULE=0,1,1 in the tests: beat's dispatcher queues the second try.
    wait_for(settled, 60, "the delivery to settle", stack.logs[1])
    assert deliveries.get_delivery(delivery_id)["status"] == "succeeded"  # type: ignore[index]
    tries = deliveries.attempts_of(delivery_id)
    assert [(a["number"], a["status_code"]) for a in tries] == [(1, 500), (2, 200)]
    assert tries[1]["at"] - tries[0]["at"] >= dt.timedelta(seconds=0.9)
    hits = stub.hits_for(key)
    assert [h.headers["webhook-id"] for h in hits] == [delivery_id, delivery_id]
    assert Webhook(secret).verify(hits[1].body, hits[1].headers)["data"] == {"order": 7}


def test_the_stack_logged_no_error(stack: Stack) -> None:
    # Last in the module: what the processes said while the tests above ran. (Beat polls the
    # tests' mailboxes too; no IMAP server listens here, so those polls fail.)
    for log in stack.logs:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if ("ERROR/" in ln or "CRITICAL/" in ln) and "poll_mailbox" not in ln]
        assert errors == [], f"{log.name}: {errors[:5]}"
        assert not any("ValueError" in ln for ln in lines), log.name
