"""Whole processes as an operator runs them: `make run` on embedded defaults, an autoscaling worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import redis
import requests
from celery import Celery
from conftest import DATABASE_URL, GH_SECRET, SPARE_REDIS_URL, TOKEN, free_port
from procs import BIN, cli, env_with, python, running, wait_for
from stub import Reply, Stub

SUBMIT = """
import json, sys
from tasks import call_service
r = call_service.delay("stub", "echo", {{"key": "{key}"}}, idempotency_key="{key}")
print(json.dumps(r.get(timeout={timeout})))
"""


def signed_github_delivery(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    headers = {
        "X-Hub-Signature-256": "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "Content-Type": "application/json",
    }
    return body, headers


def test_make_run_serves_a_job_and_a_webhook_from_other_processes_on_embedded_defaults(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    # Embedded defaults: no BROKER_URL (kombu's filesystem transport) and SQLite, all under VAR_DIR.
    env = env_with(
        BROKER_URL=None,
        RESULT_BACKEND=None,
        VAR_DIR=tmp_path / "var",
        DATABASE_URL=f"sqlite:///{tmp_path}/var/integrations.db",
        WORKER_AUTOSCALE_MAX=2,
        WORKER_AUTOSCALE_MIN=1,
        RECEIVER_PORT=(port := free_port()),
    )
    log = tmp_path / "run.log"
    with running(["make", "--no-print-directory", "run"], env, log):
        wait_for(lambda: "ready." in log.read_text(), 90, "`make run` to start its worker", log)

        # The receiver runs beside the worker: a signed webhook is stored and handled.
        body, headers = signed_github_delivery({"action": "opened"})
        r = requests.post(f"http://127.0.0.1:{port}/webhooks/gh", data=body, headers=headers, timeout=10)
        assert r.status_code == 202, r.text
        event_id = r.json()["event_id"]
        handled = wait_for(
            lambda: (
                shown if (shown := cli("events", event_id, env=env).stdout).count("succeeded") == 3 else None
            ),
            60,
            "the webhook's three handlers to succeed",
            log,
        )
        assert re.search(r"handlers_for_tests.on_pull_request +succeeded +1 ", handled), handled

        out = python(SUBMIT.format(key=key, timeout=60), env, timeout=90)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout)
        assert result["status"] == "succeeded" and result["status_code"] == 200
        jobs = cli("jobs", env=env)
        assert result["job_id"] in jobs.stdout and "succeeded" in jobs.stdout
        assert "beat: Starting" in log.read_text()
    assert len(stub.hits_for(key)) == 1
    # Everything the embedded defaults keep is its owner's alone.
    var = tmp_path / "var"
    assert var.stat().st_mode & 0o777 == 0o700
    for private in (var / "integrations.db", var / "results.db"):
        assert private.stat().st_mode & 0o777 == 0o600, private.name
    assert (var / "broker").stat().st_mode & 0o777 == 0o700


def test_the_ledger_defaults_to_sqlite_under_var_dir_made_private(tmp_path: Path) -> None:
    env = env_with(DATABASE_URL=None, BROKER_URL=None, RESULT_BACKEND=None, VAR_DIR=tmp_path / "state")
    out = cli("migrate", env=env)
    assert out.returncode == 0, out.stderr
    db = tmp_path / "state" / "integrations.db"
    assert db.stat().st_mode & 0o777 == 0o600 and (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert cli("jobs", env=env).returncode == 0


DEBUG_SUBMIT = """
from tasks import call_service
print(call_service.delay("stub_apikey", "echo", {{"key": "{key}"}}).get(timeout=60)["status"])
try:
    call_service.delay("apikey_closed", "echo", {{"key": "{key}"}}).get(timeout=60)
except Exception as e:
    print(type(e).__name__)
"""


def test_at_debug_level_no_process_logs_a_credential(tmp_path: Path, stub: Stub, key: str) -> None:
    # urllib3 logs every request line at DEBUG, query string (api_key) included; the receiver
    # and beat run beside the worker in `make run`.
    env = env_with(
        BROKER_URL=None,
        RESULT_BACKEND=None,
        VAR_DIR=tmp_path / "var",
        DATABASE_URL=f"sqlite:///{tmp_path}/var/integrations.db",
        WORKER_AUTOSCALE_MAX=2,
        WORKER_AUTOSCALE_MIN=1,
        RECEIVER_PORT=(port := free_port()),
        LOG_LEVEL="DEBUG",
    )
    log = tmp_path / "run.log"
    with running(["make", "--no-print-directory", "run"], env, log):
        wait_for(lambda: "ready." in log.read_text(), 90, "`make run` to start its worker", log)
        body, headers = signed_github_delivery({"action": "opened"})
        r = requests.post(f"http://127.0.0.1:{port}/webhooks/gh", data=body, headers=headers, timeout=10)
        assert r.status_code == 202, r.text
        out = python(DEBUG_SUBMIT.format(key=key), env, timeout=120)
        assert out.stdout.split() == ["succeeded", "TransientError"], out.stderr[-2000:]
        wait_for(lambda: "[REDACTED]" in log.read_text(), 20, "the redacted request line", log)
    text = log.read_text()
    assert "DEBUG" in text and f"/echo/{key}?api_key=[REDACTED]" in text
    for secret in (TOKEN, GH_SECRET):
        assert secret not in text


SUBMIT_MANY = """
from tasks import call_service
results = [call_service.delay("stub", "echo", {{"key": "{key}"}}) for _ in range({n})]
print(sum(r.get(timeout={timeout})["status"] == "succeeded" for r in results))
"""


def test_the_worker_pool_grows_under_a_backlog(tmp_path: Path, stub: Stub, key: str) -> None:
    # Its own Redis database, so the in-process test worker does not take these jobs.
    broker = SPARE_REDIS_URL
    env = env_with(BROKER_URL=broker, RESULT_BACKEND=broker, DATABASE_URL=DATABASE_URL)
    control = Celery(broker=broker)
    with control.connection_for_write() as conn:
        conn.default_channel.client.flushdb()
    stub.plan(key, *[Reply(delay=1.5)] * 6)  # under the service timeout (2 s)
    cmd = [str(BIN / "celery"), "-A", "tasks", "worker", "--autoscale=4,1", "--hostname=scaler@%h"]
    log = tmp_path / "worker.log"

    def autoscaler() -> dict[str, Any] | None:
        replies = control.control.inspect(timeout=1.0).stats() or {}
        return next((r["autoscaler"] for r in replies.values()), None)

    with running(cmd, env, log):
        before = wait_for(autoscaler, 60, "the worker to answer `inspect stats`", log)
        assert (before["min"], before["max"], before["current"]) == (1, 4, 1)
        with running(
            [sys.executable, "-c", SUBMIT_MANY.format(key=key, n=6, timeout=60)], env, tmp_path / "submit.log"
        ) as submitter:
            grown = wait_for(
                lambda: (a := autoscaler()) and a["current"] > 1 and a,
                30,
                "the pool to grow past one process",
                log,
            )
            assert submitter.wait(timeout=60) == 0
        assert (tmp_path / "submit.log").read_text().strip() == "6"
    assert grown["current"] <= 4
    assert len(stub.hits_for(key)) == 6
    control.close()


def test_beat_sends_its_dispatchers_sweepers_and_health_checks_on_their_intervals(
    tmp_path: Path, app: Any
) -> None:
    fixed = {
        name: (e["task"], e["schedule"], e["options"]["expires"])
        for name, e in app.conf.beat_schedule.items()
        if not name.startswith(("health-check-", "poll-mailbox-"))
    }
    assert fixed == {
        "dispatch-deferred-jobs": ("integrations.dispatch_deferred", 2.0, 2.0),
        "dispatch-due-deliveries": ("integrations.dispatch_deliveries", 2.0, 2.0),
        "requeue-stuck-jobs": ("integrations.requeue_stuck_jobs", 15.0, 13.5),
        "requeue-stuck-events": ("integrations.requeue_stuck_events", 15.0, 13.5),
    }
    # Real beat and no worker: what it sends stays on a broker of its own, to be counted.
    broker = redis.Redis.from_url(SPARE_REDIS_URL)
    broker.flushdb()
    env = env_with(BROKER_URL=SPARE_REDIS_URL, RESULT_BACKEND=SPARE_REDIS_URL, SWEEP_INTERVAL=2)
    cmd = [
        str(BIN / "celery"),
        "-A",
        "tasks",
        "beat",
        f"--schedule={tmp_path / 'schedule'}",
        "--loglevel=INFO",
    ]

    # Dispatchers and sweepers have a queue of their own, so a backlog of jobs never holds them.
    maintenance = {
        "integrations.dispatch_deferred",
        "integrations.dispatch_deliveries",
        "integrations.requeue_stuck_jobs",
        "integrations.requeue_stuck_events",
    }
    queues = ("integrations", "integrations.maintenance")

    def sent() -> dict[str, int]:
        counts: dict[str, int] = {}
        for queue in queues:
            for raw in broker.lrange(queue, 0, -1):
                task = json.loads(raw)["headers"]["task"]
                counts[f"{queue} {task}"] = counts.get(f"{queue} {task}", 0) + 1
        return counts

    with running(cmd, env, tmp_path / "beat.log"):
        counts = wait_for(
            lambda: (
                (c := sent())
                and all(c.get(f"integrations.maintenance {t}", 0) >= 2 for t in maintenance)
                and c.get("integrations integrations.health_check")
                and c
            ),
            30,
            "beat to send each entry twice and a health check",
            tmp_path / "beat.log",
        )
    assert isinstance(counts, dict)
    others = {"integrations.health_check", "integrations.poll_mailbox"}
    assert set(counts) <= {f"integrations.maintenance {t}" for t in maintenance} | {
        f"integrations {t}" for t in others
    }
    broker.flushdb()
