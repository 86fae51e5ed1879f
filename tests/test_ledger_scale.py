"""The ledger at scale (issue 15): `integrations stats` and `health` computed by the database over
a time window, `integrations prune` in batches, and beat's pruning when LEDGER_RETENTION is set.

Each test gets a ledger of its own, on Postgres (a database beside the session's) and on SQLite
(a file), migrated to head, filled with rows whose figures are known, and reads it with the
`integrations` command as an operator does.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATABASE_URL
from procs import cli, env_with
from sqlalchemy import Engine, create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

import beat_schedule
from integrations.config import Settings
from integrations.errors import ConfigError
from integrations.ledger import jobs as session_ledger
from integrations.ledger import retention
from integrations.ledger.db import make_engine
from integrations.ledger.migrate import upgrade
from integrations.ledger.models import (
    BreakerEvent,
    Delivery,
    DeliveryAttempt,
    Endpoint,
    Event,
    EventHandling,
    HealthCheck,
    Job,
    JobAttempt,
)
from tasks.celeryapp import beat_entries
from tasks.maintenance import prune_ledger

NOW = dt.datetime.now(dt.UTC)


def ago(**kw: float) -> dt.datetime:
    return NOW - dt.timedelta(**kw)


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """``(url, engine)`` of an empty ledger migrated to head, Postgres or SQLite."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        upgrade(url)
        engine = make_engine(url)
        yield url, engine
        engine.dispose()
        return
    server = make_url(DATABASE_URL)
    fresh = server.set(database=f"{server.database}_ledger")
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{fresh.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{fresh.database}"'))
    url = fresh.render_as_string(hide_password=False)
    upgrade(url)
    engine = make_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{fresh.database}" WITH (FORCE)'))
        admin.dispose()


def job(service: str, operation: str, status: str, created: dt.datetime, **kw: Any) -> dict[str, Any]:
    finished = kw.pop(
        "finished", created + dt.timedelta(seconds=1) if status in ("succeeded", "failed") else None
    )
    return {
        "id": str(uuid.uuid4()),
        "service": service,
        "operation": operation,
        "params": {},
        "status": status,
        "attempts": 1,
        "created_at": created,
        "updated_at": finished or created,
        "finished_at": finished,
        # Every row the same keys: one executemany.
        **{"latency_ms": None, "input_tokens": None, "output_tokens": None, **kw},
    }


def table(stdout: str) -> dict[str, list[str]]:
    """The command's table by its rows' first two cells (or first one), cells split on spaces."""
    lines = stdout.splitlines()[1:]
    return {" ".join(line.split()[:2]): line.split() for line in lines}


# ------------------------------------------------------------------------------------------------
# integrations stats
# ------------------------------------------------------------------------------------------------

#: Latencies (ms) of the jobs of the last hour, and their percentiles interpolated between the
#: closest ranks (Postgres's percentile_cont): p50 halfway between the 10th and 11th sorted
#: (60, 200), p95 at rank 18.05 of 0..19, a twentieth of the way from 700 to 1600.
RECENT = [40] * 9 + [60, 200] + [250] * 7 + [700, 1600]
OLD = [10_000] * 5  # three hours ago


def test_stats_count_rate_percentiles_and_tokens_per_group_over_a_window(ledger: tuple[str, Engine]) -> None:
    url, engine = ledger
    rows = [
        *(job("svc_a", "get", "succeeded", ago(minutes=10), latency_ms=ms) for ms in RECENT[:18]),
        *(job("svc_a", "get", "failed", ago(minutes=10), latency_ms=ms) for ms in RECENT[18:]),
        job("svc_a", "get", "queued", ago(minutes=1)),  # counted, no latency
        job("svc_a", "get", "running", ago(minutes=1), latency_ms=99_999.0),  # not finished: no percentile
        *(job("svc_a", "get", "succeeded", ago(hours=3), latency_ms=ms) for ms in OLD),
        job(
            "svc_llm", "chat", "succeeded", ago(minutes=5), latency_ms=300, input_tokens=100, output_tokens=10
        ),
        job("svc_llm", "chat", "succeeded", ago(minutes=5), latency_ms=500, input_tokens=50),
        job(
            "svc_llm", "chat", "succeeded", ago(days=2), latency_ms=500, input_tokens=1000, output_tokens=1000
        ),
    ]
    with engine.begin() as conn:
        conn.execute(insert(Job), rows)
    env = env_with(DATABASE_URL=url)

    hour = cli("stats", "--since", "1h", env=env)
    assert hour.returncode == 0, hour.stderr
    assert hour.stdout.splitlines()[0].split() == [
        "SERVICE", "OPERATION", "COUNT", "SUCCEEDED", "FAILED", "SUCCESS", "P50_MS", "P95_MS",
        "INPUT_TOKENS", "OUTPUT_TOKENS",
    ]  # fmt: skip
    got = table(hour.stdout)
    assert got["svc_a get"] == ["svc_a", "get", "22", "18", "2", "90%", "130.0", "745.0", "-", "-"]
    # Tokens summed where any job reported some (a job without output_tokens counts 0).
    assert got["svc_llm chat"] == ["svc_llm", "chat", "2", "2", "0", "100%", "400.0", "490.0", "150", "10"]

    everything = cli("stats", env=env)
    assert everything.returncode == 0, everything.stderr
    got = table(everything.stdout)
    q = statistics.quantiles(sorted(RECENT + OLD), n=100, method="inclusive")
    assert got["svc_a get"][:6] == ["svc_a", "get", "27", "23", "2", "92%"]
    assert got["svc_a get"][6:8] == [f"{q[49]:.1f}", f"{q[94]:.1f}"]
    assert got["svc_llm chat"][2:] == ["3", "3", "0", "100%", "500.0", "500.0", "1150", "1010"]

    week = table(cli("stats", "--since", "7d", env=env).stdout)
    assert week["svc_a get"][2] == "27" and week["svc_llm chat"][2] == "3"
    nothing = cli("stats", "--since", "30s", env=env)
    assert nothing.returncode == 0 and len(nothing.stdout.splitlines()) == 1  # the header alone


def test_stats_of_the_library_match_the_command_on_the_sessions_ledger() -> None:
    # The library's call (as the llm tests use it) returns the same rows, with None for "-".
    rows = session_ledger.stats(since=NOW - dt.timedelta(days=3650))
    assert rows == session_ledger.stats()
    for row in rows:
        assert set(row) == {
            "service", "operation", "count", "succeeded", "failed", "success_rate", "p50_ms", "p95_ms",
            "input_tokens", "output_tokens",
        }  # fmt: skip


def test_on_postgres_autovacuum_keeps_the_jobs_visibility_map_fresh_for_the_stats_index() -> None:
    # The session's ledger, migrated like every deployment.
    engine = create_engine(DATABASE_URL)
    try:
        with engine.connect() as conn:
            options = conn.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'jobs'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert set(options) == {
        "autovacuum_vacuum_scale_factor=0.02",
        "autovacuum_vacuum_insert_scale_factor=0.02",
        "autovacuum_analyze_scale_factor=0.02",
    }


@pytest.mark.parametrize("bad", ["1x", "h", "1.5.h", "0m", "1 day"])
def test_a_window_that_is_not_a_duration_is_one_line(bad: str) -> None:
    out = cli("stats", "--since", bad)
    assert out.returncode == 2
    assert "--since: must be a positive number and a unit: s, m, h, d or w (e.g. 30m, 7d)" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------
# integrations health
# ------------------------------------------------------------------------------------------------


def test_health_shows_the_latest_check_the_last_error_and_the_pass_rate_of_a_window(
    ledger: tuple[str, Engine],
) -> None:
    url, engine = ledger
    checks = [  # stub_health: newest first
        (ago(minutes=1), True, 200, None),
        (ago(minutes=10), True, 200, None),
        (ago(minutes=30), False, 500, "HTTP 500 boom"),
        (ago(hours=2), True, 200, None),
        (ago(hours=3), False, 503, "HTTP 503 Service Unavailable"),
        (ago(days=2), True, 200, None),  # before the default window of 24 h
    ]
    rows = [
        {
            "service": "stub_health",
            "ok": ok,
            "status_code": code,
            "latency_ms": 12.5,
            "error": err,
            "checked_at": at,
        }
        for at, ok, code, err in checks
    ]
    # stub_health_op: failing now, never passed.
    rows.append(
        {"service": "stub_health_op", "ok": False, "status_code": None, "latency_ms": None,
         "error": "ConnectError: refused", "checked_at": ago(minutes=2)}
    )  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(HealthCheck), rows)
    env = env_with(DATABASE_URL=url)

    out = cli("health", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[-2:] == ["CHECKS", "PASSED"]
    shown = {line.split()[0]: line.split() for line in lines[1:] if " last error at " not in line}
    health, op = shown["stub_health"], shown["stub_health_op"]
    assert health[1:4] == ["healthy", "200", "12.5"] and health[-2:] == ["5", "60%"]  # the last 24 h
    assert op[1:4] == ["unhealthy", "-", "-"] and op[-2:] == ["1", "0%"]
    assert f"stub_health: last error at {ago(minutes=30):%Y-%m-%d %H:%M:%S}: HTTP 500 boom" in lines
    assert f"stub_health_op: last error at {ago(minutes=2):%Y-%m-%d %H:%M:%S}: ConnectError: refused" in lines
    # The services with a health check and none recorded yet.
    others = [r for name, r in shown.items() if name not in ("stub_health", "stub_health_op")]
    assert others and all(r[1:4] == ["unknown", "-", "-"] and r[-2:] == ["0", "-"] for r in others)

    hour = cli("health", "--since", "1h", env=env)
    row = next(line.split() for line in hour.stdout.splitlines() if line.startswith("stub_health "))
    assert row[-2:] == ["3", "67%"]
    two = cli("health", "--since", "150m", env=env)
    row = next(line.split() for line in two.stdout.splitlines() if line.startswith("stub_health "))
    assert row[-2:] == ["4", "75%"]


# ------------------------------------------------------------------------------------------------
# integrations prune
# ------------------------------------------------------------------------------------------------


def fill_for_pruning(engine: Engine) -> dict[str, set[Any]]:
    """Rows on either side of a 30-day bound; returns the ids that must stay, per table."""
    old, recent = ago(days=40), ago(days=1)
    gone_jobs = [job("s", "op", "succeeded", old) for _ in range(4)] + [job("s", "op", "failed", old)]
    kept_jobs = [
        job("s", "op", "running", old),  # an old job still running: not finished, kept
        job("s", "op", "succeeded", old, finished=ago(days=10)),  # made long ago, finished lately
        job("s", "op", "succeeded", recent),
        job("s", "op", "deferred", old),
    ]
    attempts = [
        {"job_id": j["id"], "number": n, "outcome": j["status"], "started_at": j["created_at"],
         "finished_at": j["updated_at"]}
        for j in gone_jobs + kept_jobs
        for n in (1, 2)
    ]  # fmt: skip

    def event(received: dt.datetime, dispatched: bool) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()), "source": "gh", "event_type": "push", "delivery_id": uuid.uuid4().hex,
            "payload": {}, "received_at": received, "dispatched_at": received if dispatched else None,
        }  # fmt: skip

    gone_events = [event(old, True), event(old, True), event(old, True)]  # handled, one without handlers
    open_event, undispatched, recent_event = event(old, True), event(old, False), event(recent, True)

    def handling(e: dict[str, Any], handler: str, status: str) -> dict[str, Any]:
        return {"event_id": e["id"], "handler": handler, "status": status, "attempts": 1,
                "created_at": e["received_at"], "updated_at": e["received_at"]}  # fmt: skip

    handlings = [
        handling(gone_events[0], "a", "succeeded"),
        handling(gone_events[0], "b", "failed"),
        handling(gone_events[1], "a", "succeeded"),
        handling(open_event, "a", "succeeded"),
        handling(open_event, "b", "retrying"),  # still being handled: the event stays
        handling(recent_event, "a", "succeeded"),
    ]
    endpoint = {"id": "ep_1", "url": "https://x.example/h", "secret": "whsec_x", "event_types": ["*"],
                "enabled": True, "created_at": old}  # fmt: skip

    def delivery(status: str, created: dt.datetime, finished: dt.datetime | None) -> dict[str, Any]:
        return {"id": "msg_" + uuid.uuid4().hex, "endpoint_id": "ep_1", "event_type": "e", "body": "{}",
                "status": status, "attempts": 1, "created_at": created, "updated_at": created,
                "finished_at": finished}  # fmt: skip

    gone_deliveries = [delivery("succeeded", old, old), delivery("failed", old, old)]
    kept_deliveries = [delivery("pending", old, None), delivery("succeeded", recent, recent)]
    delivery_attempts = [
        {"delivery_id": d["id"], "number": 1, "ok": True, "at": d["created_at"]}
        for d in gone_deliveries + kept_deliveries
    ]
    checks = [
        {"service": "s", "ok": True, "checked_at": at}
        for at in (old, old, ago(days=31), recent, ago(minutes=1))
    ]
    breakers = [{"service": "s", "state": "open", "reason": "r", "at": at} for at in (old, recent)]
    with engine.begin() as conn:
        conn.execute(insert(Job), gone_jobs + kept_jobs)
        conn.execute(insert(JobAttempt), attempts)
        conn.execute(insert(Event), [*gone_events, open_event, undispatched, recent_event])
        conn.execute(insert(EventHandling), handlings)
        conn.execute(insert(Endpoint), endpoint)
        conn.execute(insert(Delivery), gone_deliveries + kept_deliveries)
        conn.execute(insert(DeliveryAttempt), delivery_attempts)
        conn.execute(insert(HealthCheck), checks)
        conn.execute(insert(BreakerEvent), breakers)
    return {
        "jobs": {j["id"] for j in kept_jobs},
        "events": {open_event["id"], undispatched["id"], recent_event["id"]},
        "handled": {open_event["id"], recent_event["id"]},  # the kept events with handlings
        "deliveries": {d["id"] for d in kept_deliveries},
    }


def remaining(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:

        def count(model: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(model)).scalar_one())

        return {
            "jobs": set(conn.execute(select(Job.id)).scalars()),
            "job_attempts": set(conn.execute(select(JobAttempt.job_id)).scalars()),
            "events": set(conn.execute(select(Event.id)).scalars()),
            "event_handlings": set(conn.execute(select(EventHandling.event_id)).scalars()),
            "deliveries": set(conn.execute(select(Delivery.id)).scalars()),
            "delivery_attempts": set(conn.execute(select(DeliveryAttempt.delivery_id)).scalars()),
            "health_checks": count(HealthCheck),
            "breaker_events": count(BreakerEvent),
        }


def test_prune_deletes_what_finished_before_the_bound_in_batches_and_keeps_the_rest(
    ledger: tuple[str, Engine],
) -> None:
    url, engine = ledger
    kept = fill_for_pruning(engine)

    out = cli("prune", "--older-than", "30d", "--batch", "2", env=env_with(DATABASE_URL=url))
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(
        r"deleted 5 jobs, 3 events, 2 deliveries, 3 health checks, 1 breaker events older than 30d "
        r"\((\d+) batches, the longest \d+\.\d\d s\)",
        out.stdout.strip(),
    )
    assert m, out.stdout
    # Two rows a batch: 5 jobs take 3 (the last one short), 3 events 2, 2 deliveries 2 (the
    # second finds none), 3 checks 2, 1 breaker event 1.
    assert int(m.group(1)) == 3 + 2 + 2 + 2 + 1

    left = remaining(engine)
    assert left["jobs"] == kept["jobs"] and left["job_attempts"] == kept["jobs"]  # attempts went along
    assert left["events"] == kept["events"]
    assert left["event_handlings"] == kept["events"] - {
        next(iter(kept["events"] - left["event_handlings"]), "")
    }
    assert left["deliveries"] == kept["deliveries"] and left["delivery_attempts"] == kept["deliveries"]
    assert left["health_checks"] == 2 and left["breaker_events"] == 1

    again = cli("prune", "--older-than", "30d", env=env_with(DATABASE_URL=url))
    assert again.stdout.startswith(
        "deleted 0 jobs, 0 events, 0 deliveries, 0 health checks, 0 breaker events"
    )


def test_prune_needs_a_positive_span() -> None:
    out = cli("prune", "--older-than", "0d")
    assert out.returncode == 2 and "--older-than: must be a positive number" in out.stderr
    assert cli("prune").returncode == 2  # no default: nothing is deleted by accident


# ------------------------------------------------------------------------------------------------
# LEDGER_RETENTION: beat prunes every hour
# ------------------------------------------------------------------------------------------------


def test_beat_prunes_every_hour_when_ledger_retention_is_set() -> None:
    entries = beat_entries(Settings(ledger_retention="30d"), {}, {})
    assert entries["prune-ledger"] == {
        "task": "integrations.prune_ledger",
        "schedule": beat_schedule.PRUNE_EVERY,
        "args": (30 * 86400.0,),
        "options": {"expires": beat_schedule.PRUNE_EVERY * 0.9},
    }
    assert "prune-ledger" not in beat_entries(Settings(), {}, {})
    assert "prune-ledger" not in beat_entries(Settings(ledger_retention=""), {}, {})


def test_a_retention_that_is_not_a_duration_stops_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from integrations.config import load_settings

    monkeypatch.setenv("LEDGER_RETENTION", "30 days")
    with pytest.raises(ConfigError, match="LEDGER_RETENTION: must be a positive number and a unit"):
        load_settings()


def test_the_beat_task_prunes_the_ledger_and_stops_at_its_time_limit() -> None:
    # On the session's ledger, as a worker runs it: an old finished job goes, a recent one stays.
    old = job("prune_probe", "op", "succeeded", ago(days=400))
    recent = job("prune_probe", "op", "succeeded", ago(minutes=5))
    engine = make_engine(DATABASE_URL)
    try:
        with engine.begin() as conn:
            conn.execute(insert(Job), [old, recent])
        # A time limit already spent: not one batch starts, and it says it is not complete.
        assert retention.prune(dt.timedelta(days=365), time_limit=0) == retention.Pruned(
            counts={"jobs": 0}, complete=False
        )
        assert prune_ledger.apply((365 * 86400.0,)).get() >= 1
        with engine.connect() as conn:
            left = set(conn.execute(select(Job.id).where(Job.service == "prune_probe")).scalars())
    finally:
        engine.dispose()
    assert left == {recent["id"]}
