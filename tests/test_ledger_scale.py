"""The ledger at scale (issue 15): `integrations stats` and `health` computed by the database over
a time window.

Each test gets a ledger of its own, on Postgres (a database beside the session's) and on SQLite
(a file), migrated to head, filled with rows whose figures are known, and reads it with the
`integrations` command as an operator does.
"""

from __future__ import annotations

import datetime as dt
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATABASE_URL
from procs import cli, env_with
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.engine import make_url

from integrations.ledger import jobs as session_ledger
from integrations.ledger.db import make_engine
from integrations.ledger.migrate import upgrade
from integrations.ledger.models import (
    HealthCheck,
    Job,
)

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
    assert health[1:4] == ["healthy", "200", "12.5"] and health[-2:] == ["5", "60%"]
    assert op[1:4] == ["unhealthy", "-", "-"] and op[-2:] == ["1", "0%"]
    assert f"stub_health: last error at {ago(minutes=30):%Y-%m-%d %H:%M:%S}: HTTP 500 boom" in lines
    assert f"stub_health_op: last error at {ago(minutes=2):%Y-%m-%d %H:%M:%S}: ConnectError: refused" in lines
    # The services with a health check and none recorded yet.
    others = [r for name, r in shown.items() if name not in ("stub_health", "stub_health_op")]
    assert others and all(r[1:4] == ["unknown", "-", "-"] and r[-2:] == ["0", "-"] for r in others)

    hour = cli("health", "--since", "1h", env=env)
    row = next(line.split() for line in hour.stdout.splitlines() if line.startswith("stub_health "))
    assert row[-2:] == ["3", "67%"]
