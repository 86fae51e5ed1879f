"""Prometheus metrics (issue 15): scraped from the exporter and the receiver during a real run
(a prefork worker, the receiver and the exporter as processes, jobs from an agent's process),
they agree with the ledger; the docker/ dashboard, alerts and scrape config name only metrics
the exporter serves."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from conftest import GH_SECRET, ROOT, SPARE_REDIS_URL, TOKEN, free_port
from llm_server import LlmServer
from procs import BIN, env_with, python, running, wait_for
from sqlalchemy import delete, func, select
from stub import Reply, Stub

from integrations.ledger.db import get_engine
from integrations.ledger.models import Event, Job, JobAttempt
from integrations.observability import metrics, metrics_exporter

SUBMIT = """
import json
from tasks import call_service
plan = json.loads({plan!r})
results = [call_service.delay(service, operation, params) for service, operation, params in plan]
ids = []
for r in results:
    try:
        r.get(timeout=90)
    except Exception:
        pass
    ids.append(r.id)
print(json.dumps(ids))
"""


def _delivery(source_secret: str, payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    return body, {
        "X-Hub-Signature-256": "sha256=" + hmac.new(source_secret.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "Content-Type": "application/json",
    }


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = requests.get(url, timeout=10)
    r.raise_for_status()
    return metrics_exporter.parse(r.text)


def test_the_counters_scraped_during_a_real_run_match_the_ledger(tmp_path: Path, stub: Stub) -> None:
    run = uuid.uuid4().hex[:8]
    ok, retry, fail = f"ok{run}", f"re{run}", f"no{run}"
    stub.plan(retry, Reply(500), Reply(502))  # two attempts retried, the third succeeds
    stub.plan(fail, *[Reply(404)] * 2)  # permanent: one attempt each
    echo = [("stub", ok)] * 6 + [("stub", retry)] + [("stub", fail)] * 2 + [("stub_global", f"gl{run}")] * 12
    # stub_global: 20/s, burst 5, so some of the twelve wait for the limiter. And two LLM calls.
    chat = {"messages": [{"role": "user", "content": f"[{run}] how many tokens is this?"}]}
    plan = [(service, "echo", {"key": k}) for service, k in echo] + [("llm_openai", "chat", chat)] * 2
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    folder = tmp_path / "metrics"
    exporter_port, receiver_port = free_port(), free_port()
    env = env_with(
        BROKER_URL=SPARE_REDIS_URL,
        RESULT_BACKEND=SPARE_REDIS_URL,
        PROMETHEUS_MULTIPROC_DIR=folder,
        METRICS_PORT=exporter_port,
        METRICS_CACHE_SECONDS=1,
        RECEIVER_PORT=receiver_port,
    )
    worker = [str(BIN / "celery"), "-A", "tasks", "worker", "--pool=prefork", "--concurrency=2",
              f"--hostname=metrics-{run}@%h", "--without-gossip", "--without-mingle"]  # fmt: skip
    exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"
    receiver = f"http://127.0.0.1:{receiver_port}"
    llm = LlmServer(int(os.environ["LLM_PORT"]), TOKEN).start()
    with (
        contextlib.ExitStack() as stop_llm,
        running(worker, env, tmp_path / "worker.log"),
        running([str(BIN / "integrations"), "metrics"], env, tmp_path / "exporter.log"),
        running([str(BIN / "integrations"), "receiver"], env, tmp_path / "receiver.log"),
    ):
        stop_llm.callback(llm.server_close)
        stop_llm.callback(llm.shutdown)
        wait_for(
            lambda: requests.get(exporter_url, timeout=2).ok, 60, "the exporter", tmp_path / "exporter.log"
        )
        wait_for(lambda: requests.get(f"{receiver}/healthz", timeout=2).ok, 60, "the receiver")
        out = python(SUBMIT.format(plan=json.dumps(plan)), env, timeout=150)
        assert out.returncode == 0, out.stderr[-3000:]
        ids: list[str] = json.loads(out.stdout)

        codes = []
        for n in range(3):
            body, headers = _delivery(GH_SECRET, {"run": run, "n": n})
            codes.append(requests.post(f"{receiver}/webhooks/gh", data=body, headers=headers, timeout=10))
        body, headers = _delivery("not the secret", {"run": run})
        codes.append(requests.post(f"{receiver}/webhooks/gh", data=body, headers=headers, timeout=10))
        codes.append(requests.post(f"{receiver}/webhooks/no-such-{run}", data=b"{}", timeout=10))
        assert [r.status_code for r in codes] == [202, 202, 202, 401, 404]

        # Every job has settled: the counters are complete once the last child wrote its share.
        def complete() -> dict[Any, float] | None:
            samples = _scrape(exporter_url)
            done = metrics_exporter.value(samples, "integrations_jobs_finished_total")
            return samples if done >= len(ids) else None

        scraped = wait_for(
            complete, 30, "the exporter to count every finished job", tmp_path / "exporter.log"
        )
        at_receiver = _scrape(f"{receiver}/metrics")

    with get_engine().connect() as conn:
        jobs = conn.execute(
            select(Job.service, Job.operation, Job.status, func.count()).where(Job.id.in_(ids))
            .group_by(Job.service, Job.operation, Job.status)
        ).all()  # fmt: skip
        attempts = conn.execute(
            select(Job.service, JobAttempt.outcome, JobAttempt.status_code, func.count())
            .join(Job, Job.id == JobAttempt.job_id).where(Job.id.in_(ids))
            .group_by(Job.service, JobAttempt.outcome, JobAttempt.status_code)
        ).all()  # fmt: skip
        used = conn.execute(
            select(func.sum(Job.input_tokens), func.sum(Job.output_tokens)).where(
                Job.id.in_(ids), Job.service == "llm_openai"
            )
        ).one()
        stored = conn.execute(
            select(func.count()).select_from(Event).where(Event.payload["run"].as_string() == run)
        ).scalar_one()
    assert {status for *_, status, _ in jobs} <= {"succeeded", "failed"}

    # Jobs: submitted (by the agent's process), finished by outcome, and their durations.
    for service, _, status, count in jobs:
        assert (
            metrics_exporter.value(
                scraped, "integrations_jobs_finished_total", service=service, outcome=status
            )
            == count
        )
        assert (
            metrics_exporter.value(scraped, "integrations_job_seconds_count", service=service, outcome=status)
            == count
        )
    for service in ("stub", "stub_global", "llm_openai"):
        submitted = sum(1 for s, *_ in plan if s == service)
        assert (
            metrics_exporter.value(scraped, "integrations_jobs_submitted_total", service=service) == submitted
        )
    assert (
        metrics_exporter.value(scraped, "integrations_jobs_finished_total", service="stub", outcome="failed")
        == 2
    )
    # Attempts by outcome and upstream status code, retries, as the ledger's attempt rows say.
    by_outcome: dict[tuple[str, str], int] = {}
    by_code: dict[tuple[str, str], int] = {}
    for service, outcome, status_code, count in attempts:
        by_outcome[(service, outcome)] = by_outcome.get((service, outcome), 0) + count
        by_code[(service, str(status_code))] = by_code.get((service, str(status_code)), 0) + count
    for (service, outcome), count in by_outcome.items():
        assert (
            metrics_exporter.value(
                scraped, "integrations_job_attempts_total", service=service, outcome=outcome
            )
            == count
        )
    for (service, code), count in by_code.items():
        assert (
            metrics_exporter.value(
                scraped, "integrations_upstream_responses_total", service=service, code=code
            )
            == count
        )
    assert by_outcome[("stub", "retrying")] == 2
    assert (
        metrics_exporter.value(
            scraped, "integrations_jobs_retried_total", service="stub", error="TransientError"
        )
        == 2
    )
    total_attempts = sum(by_outcome.values())
    assert metrics_exporter.value(scraped, "integrations_attempt_seconds_count") == total_attempts
    # The limiter: every call of stub_global went on a slot taken at its time; each run it put
    # off kept a slot ahead, and was counted as deferred for the limit.
    global_calls = by_outcome[("stub_global", "succeeded")]
    assert (
        metrics_exporter.value(scraped, "integrations_limiter_slots_total", service="stub_global", when="now")
        == global_calls
    )
    deferred = metrics_exporter.value(
        scraped, "integrations_jobs_deferred_total", service="stub_global", cause="limit"
    )
    assert deferred >= 1
    assert (
        metrics_exporter.value(
            scraped, "integrations_limiter_slots_total", service="stub_global", when="ahead"
        )
        == deferred
    )
    assert (
        metrics_exporter.value(scraped, "integrations_limiter_wait_seconds_count", service="stub_global")
        == deferred
    )
    # The LLM's tokens, as the jobs recorded them.
    assert len(llm.hits) == 2 and used[0] and used[1]
    assert (
        metrics_exporter.value(
            scraped, "integrations_llm_tokens_total", service="llm_openai", direction="input"
        )
        == used[0]
    )
    assert (
        metrics_exporter.value(
            scraped, "integrations_llm_tokens_total", service="llm_openai", direction="output"
        )
        == used[1]
    )
    # The state read from elsewhere: nothing open for these services, the broker's queue empty,
    # every breaker closed, each source read.
    assert metrics_exporter.value(scraped, "integrations_queue_messages", queue="integrations") == 0
    assert metrics_exporter.value(scraped, "integrations_breaker_state", service="stub") == 0
    for source in ("ledger", "redis", "broker"):
        assert metrics_exporter.value(scraped, "integrations_exporter_source_up", source=source) == 1
    # The receiver counts what it answered, by source; the exporter leaves that to it.
    assert (
        metrics_exporter.value(at_receiver, "integrations_webhooks_received_total", source="gh", code="202")
        == stored
        == 3
    )
    assert (
        metrics_exporter.value(at_receiver, "integrations_webhooks_received_total", source="gh", code="401")
        == 1
    )
    assert (
        metrics_exporter.value(
            at_receiver, "integrations_webhooks_received_total", source="unknown", code="404"
        )
        == 1
    )
    assert metrics_exporter.value(scraped, "integrations_webhooks_received_total") == 0
    assert metrics_exporter.value(at_receiver, "integrations_jobs_finished_total") == 0
    # No label holds a job id or an agent's name, and the files are the owner's alone.
    assert not any(re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", v) for (_, ls) in scraped for _, v in ls)
    assert folder.stat().st_mode & 0o777 == 0o700
    roles = {p.name.rsplit("_", 1)[-1].split(".")[0] for p in folder.glob("*.db")}
    assert roles == {"worker", "agent", "receiver"}


def test_the_open_jobs_gauges_are_the_ledgers_grouped_counts(tmp_path: Path) -> None:
    # No worker takes these: they stay queued, and the exporter reports them with their age.
    folder = tmp_path / "metrics"
    env = env_with(
        BROKER_URL=SPARE_REDIS_URL, RESULT_BACKEND=SPARE_REDIS_URL, PROMETHEUS_MULTIPROC_DIR=folder
    )
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    out = python(
        "from tasks import call_service\n"
        "print(' '.join(call_service.delay('obs_queued', 'echo', {'key': 'q'}).id for _ in range(3)))",
        env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        port = free_port()
        with running(
            [str(BIN / "integrations"), "metrics"], {**env, "METRICS_PORT": str(port)}, tmp_path / "e.log"
        ):
            url = f"http://127.0.0.1:{port}/metrics"
            scraped = wait_for(lambda: _scrape(url), 60, "the exporter", tmp_path / "e.log")
        with get_engine().connect() as conn:
            queued = conn.execute(
                select(func.count())
                .select_from(Job)
                .where(Job.service == "obs_queued", Job.status == "queued")
            ).scalar_one()
        assert queued >= 3
        assert (
            metrics_exporter.value(scraped, "integrations_jobs_open", service="obs_queued", status="queued")
            == queued
        )
        assert (
            metrics_exporter.value(
                scraped, "integrations_jobs_oldest_seconds", service="obs_queued", status="queued"
            )
            >= 0
        )
        assert metrics_exporter.value(scraped, "integrations_queue_messages", queue="integrations") == 3
    finally:
        with get_engine().begin() as conn:
            conn.execute(delete(Job).where(Job.id.in_(out.stdout.split())))
        redis.Redis.from_url(SPARE_REDIS_URL).flushdb()


# --------------------------------------------------------------------------------------------
# docker/: the scrape config, the dashboard and the alerts name what the exporter serves
# --------------------------------------------------------------------------------------------

DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def served_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names of every family the exporter and the receiver serve, each recorded once into a
    folder of their own (every recording function, then both registries rendered)."""
    from prometheus_client import values

    from tasks.observe import queue_depths

    folder = tmp_path_factory.mktemp("metrics")
    saved = dict(metrics.__dict__)
    value_class = values.ValueClass
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
            from integrations.config import settings

            settings.get_settings.cache_clear()
            for role in ("worker", metrics.RECEIVER):
                metrics.start(role)
                metrics.job_submitted("stub", "echo", None)
                metrics.attempt("stub", "echo", "succeeded", 0.01, 200)
                metrics.job_retried("stub", "echo", "TransientError")
                metrics.job_finished("stub", "echo", "succeeded", None, 0.5)
                metrics.job_deferred("stub", "limit", 0.2)
                metrics.limiter_slot("stub", True)
                metrics.paused("stub", "method:x")
                metrics.tokens("llm_openai", "chat", 3, 4)
                metrics.webhook_received("gh", 202)
                metrics.delivery_tried("succeeded")
                metrics.mailbox_polled("mail_repeat", "ok", 1, 1)
            text = metrics_exporter.render(metrics_exporter.exporter_registry(queue_depths, folder))[
                0
            ].decode()
            text += metrics_exporter.render(metrics_exporter.receiver_registry(folder))[0].decode()
            settings.get_settings.cache_clear()
    finally:
        for name in ("_role", "_checked", "_metrics"):
            setattr(metrics, name, saved[name])
        values.ValueClass = value_class
    return metrics_exporter.family_names(text)


def _referenced(expr: str) -> set[str]:
    """Metric names in a PromQL expression (ours all start with integrations_)."""
    return set(re.findall(r"\bintegrations_[a-z_]+\b", expr))


def test_the_scrape_config_scrapes_the_exporter_and_the_receiver() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {t for j in jobs.values() for c in j.get("static_configs", []) for t in c["targets"]}
    targets |= {n for j in jobs.values() for c in j.get("dns_sd_configs", []) for n in c["names"]}
    assert any(t.startswith("metrics:") for t in targets) and any("receiver" in t for t in targets)
    assert "alerts.yml" in " ".join(config["rule_files"])
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert {"metrics", "prometheus", "grafana"} <= set(compose["services"])
    # The exporter reads the files the workers and beat write: one volume, at the folder they use.
    for name in ("worker", "beat", "metrics"):
        service = compose["services"][name]
        folder = service["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        assert f"metrics-data:{folder}" in service["volumes"], name
    assert compose["services"]["metrics"]["command"] == ["integrations", "metrics"]


def test_every_alert_names_metrics_the_exporter_serves(served_names: set[str]) -> None:
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"BreakerOpen", "JobFailureRateHigh", "QueueWaitHigh", "EndpointDisabled"} <= set(alerts)
    assert alerts["BreakerOpen"]["for"] == "5m"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] and rule["annotations"]["summary"], name
        names = _referenced(rule["expr"])
        assert names and names <= served_names, (name, names - served_names)


def test_every_dashboard_panel_queries_metrics_the_exporter_serves(served_names: set[str]) -> None:
    dashboard = json.loads((DOCKER / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["title"] and dashboard["uid"] and len(panels) >= 12
    shown: set[str] = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel.get("title")
        for target in panel["targets"]:
            names = _referenced(target["expr"])
            assert names and names <= served_names, (panel["title"], names - served_names)
            shown |= names
    # Every family is on the dashboard (histograms through their _bucket or _count).
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in served_names}
    on_dashboard = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in shown}
    assert families - on_dashboard == set()
