"""Logs (issue 15): one structured line per job event, JSON with LOG_FORMAT=json in every process
(worker, receiver, CLI) and redacted at DEBUG; readable text otherwise; beat's dispatchers and
sweepers quiet at INFO while they find nothing to do."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import redis
import requests
from conftest import GH_SECRET, SPARE_REDIS_URL, TOKEN, free_port
from procs import BIN, cli, env_with, running, wait_for
from stub import Reply, Stub
from test_processes import signed_github_delivery

from integrations import jobs, redact
from integrations.ledger import sweeps
from integrations.ledger.models import utcnow
from integrations.observability.logs import JsonFormatter


def _worker(name: str, level: str, *extra: str) -> list[str]:
    return [str(BIN / "celery"), "-A", "tasks", "worker", "--pool=prefork", "--concurrency=2",
            f"--hostname={name}@%h", "--without-gossip", "--without-mingle", f"--loglevel={level}",
            *extra]  # fmt: skip


def _events(lines: list[dict[str, Any]], job_id: str) -> list[str]:
    return [line["event"] for line in lines if line.get("job_id") == job_id and "event" in line]


def test_with_log_format_json_every_process_writes_json_lines_with_the_job_events_and_no_secret(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    env = env_with(
        BROKER_URL=SPARE_REDIS_URL,
        RESULT_BACKEND=SPARE_REDIS_URL,
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        RECEIVER_PORT=(port := free_port()),
        PROMETHEUS_MULTIPROC_DIR=tmp_path / "metrics",
    )
    stub.plan(key, Reply(500))  # attempt 1 fails and is retried
    worker_log, receiver_log = tmp_path / "worker.log", tmp_path / "receiver.log"
    with (
        running(_worker("json", "DEBUG"), env, worker_log),
        running([str(BIN / "integrations"), "receiver"], env, receiver_log),
    ):
        wait_for(lambda: "ready." in worker_log.read_text(), 60, "the worker", worker_log)
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok, 60, "the receiver")
        retried = cli(
            "call", "stub", "echo", f"key={key}", "--agent", "logger", "--wait", env=env, timeout=90
        )
        # api_key in the query string: urllib3 logs the request line at DEBUG.
        in_query = cli("call", "stub_apikey", "echo", f"key={key}q", "--wait", env=env, timeout=90)
        body, headers = signed_github_delivery({"action": "opened"})
        r = requests.post(f"http://127.0.0.1:{port}/webhooks/gh", data=body, headers=headers, timeout=10)
        assert r.status_code == 202
        job_id = json.loads(retried.stdout)["job_id"]
        wait_for(lambda: f'"job_id": "{job_id}"' in worker_log.read_text(), 30, "the job's lines", worker_log)
        time.sleep(1)  # the last lines of the other job
    assert retried.returncode == 0 and in_query.returncode == 0, retried.stderr + in_query.stderr

    # Every line on stderr of the worker, the receiver and the CLI is one JSON object.
    outputs = {"worker": worker_log.read_text(), "receiver": receiver_log.read_text(), "cli": retried.stderr}
    parsed: dict[str, list[dict[str, Any]]] = {}
    for name, text in outputs.items():
        lines = [line for line in text.splitlines() if line.strip()]
        # Celery prints its banner on stdout (the same file here), not through logging.
        lines = [line for line in lines if line.startswith("{")] if name == "worker" else lines
        parsed[name] = [json.loads(line) for line in lines]
        assert parsed[name], name
        assert all({"time", "level", "logger", "message"} <= set(p) for p in parsed[name]), name
        for secret in (TOKEN, GH_SECRET):
            assert secret not in text, name
    worker_lines = parsed["worker"]
    assert any(p["level"] == "DEBUG" for p in worker_lines)
    assert any("api_key=[REDACTED]" in p["message"] for p in worker_lines)
    assert any(p["logger"].startswith("uvicorn") for p in parsed["receiver"])

    # The job's events, in order, each with its fields.
    assert _events(parsed["cli"], job_id) == ["submitted"]
    assert _events(worker_lines, job_id) == ["attempt", "retry", "attempt", "outcome"]
    first, retry, second, outcome = (p for p in worker_lines if p.get("job_id") == job_id and "event" in p)
    assert first["service"] == "stub" and first["operation"] == "echo" and first["agent"] == "logger"
    assert (first["attempt"], first["status_code"], first["error_class"]) == (1, 500, "TransientError")
    assert first["outcome"] == "retrying" and first["latency_ms"] > 0
    assert retry["attempt"] == 1 and retry["error_class"] == "TransientError"
    assert (second["attempt"], second["status_code"], second["outcome"]) == (2, 200, "succeeded")
    assert "error_class" not in second
    assert outcome["outcome"] == "succeeded" and outcome["seconds"] > 0
    assert outcome["task"] == "integrations.call.stub" and outcome["task_id"] == job_id


def test_a_deferral_is_one_line_naming_its_cause(tmp_path: Path, stub: Stub, key: str) -> None:
    # stub_global allows 20 calls a second after a burst of 5: twelve at once wait their turn.
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    env = env_with(BROKER_URL=SPARE_REDIS_URL, RESULT_BACKEND=SPARE_REDIS_URL, LOG_FORMAT="text")
    log = tmp_path / "worker.log"
    submit = (
        "from tasks import call_service\n"
        f"rs = [call_service.delay('stub_global', 'echo', {{'key': '{key}'}}) for _ in range(12)]\n"
        "print(sum(r.get(timeout=60)['status'] == 'succeeded' for r in rs))"
    )
    with running(_worker("text", "INFO"), env, log):
        wait_for(lambda: "ready." in log.read_text(), 60, "the worker", log)
        out = cli("jobs", env=env)  # the CLI at its default level says nothing on stderr
        assert out.returncode == 0 and out.stderr == ""
        from procs import python

        done = python(submit, env, timeout=90)
        assert done.stdout.strip() == "12", done.stderr[-2000:]
        wait_for(lambda: log.read_text().count(" succeeded after ") >= 12, 20, "the outcome lines", log)
    text = log.read_text()
    deferrals = [line for line in text.splitlines() if " of stub_global deferred " in line]
    assert deferrals and all(line.rstrip().endswith("(limit)") for line in deferrals)
    assert "attempt 1 of stub_global.echo: 200 in " in text and "-> succeeded" in text


def test_beats_dispatchers_and_sweepers_are_quiet_at_info_until_they_move_something(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    env = env_with(BROKER_URL=SPARE_REDIS_URL, RESULT_BACKEND=SPARE_REDIS_URL, SWEEP_INTERVAL=2)
    housekeeping = ("dispatch_deferred", "dispatch_deliveries", "requeue_stuck_jobs", "requeue_stuck_events")

    def idle_lines(level: str) -> list[str]:
        log = tmp_path / f"{level}.log"
        cmd = _worker(f"beat-{level.lower()}", level, "--beat", f"--schedule={tmp_path / level}")
        with running(cmd, env, log):
            wait_for(lambda: "ready." in log.read_text(), 60, "the worker", log)
            time.sleep(7)  # three ticks of the dispatchers, three sweeps
        # Log records only: the banner lists the tasks too.
        records = [line for line in log.read_text().splitlines() if line.startswith("[")]
        return [line for line in records if any(t in line for t in housekeeping)]

    assert idle_lines("INFO") == []
    at_debug = idle_lines("DEBUG")
    assert any("Sending due task dispatch-deferred-jobs" in line for line in at_debug)
    assert any("integrations.requeue_stuck_jobs" in line and "succeeded" in line for line in at_debug)

    # A job parked in the ledger whose time has come: the dispatcher moves it, and says so.
    job_id, _ = jobs.enqueue("stub", "echo", {"key": key}, None, lambda *_: None)
    assert sweeps.park(job_id, utcnow())
    log = tmp_path / "moved.log"
    with running(_worker("beat-moved", "INFO", "--beat", f"--schedule={tmp_path / 'moved'}"), env, log):
        wait_for(lambda: "queued 1 deferred jobs whose time has come" in log.read_text(), 60, "the move", log)
        wait_for(lambda: f"job {job_id} succeeded after 1 attempt" in log.read_text(), 30, "the job", log)
    assert any("dispatch_deferred" in line and "succeeded" in line for line in log.read_text().splitlines())


def test_a_json_line_masks_a_credential_in_its_fields_as_in_its_message() -> None:
    redact.register(TOKEN)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "calling with %s", (TOKEN,), None)
    record.fields = {"url": f"https://example.com/?api_key={TOKEN}", "nested": {"token": TOKEN}}
    line = JsonFormatter().format(record)
    assert TOKEN not in line
    parsed = json.loads(line)
    assert parsed["message"] == "calling with [REDACTED]"
    assert parsed["url"] == "https://example.com/?api_key=[REDACTED]"
    assert parsed["nested"] == {"token": "[REDACTED]"}
