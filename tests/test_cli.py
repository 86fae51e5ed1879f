"""The `integrations` command, run as a user runs it, against the test stack and a real worker."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import redis
from conftest import DATABASE_URL, SPARE_REDIS_URL, TOKEN
from procs import cli, env_with
from sqlalchemy.engine import make_url
from stub import Reply, Stub

from integrations.ledger import reads
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")


def test_call_wait_then_jobs_job_and_stats(stub: Stub, key: str) -> None:
    out = cli("call", "stub", "echo", f"key={key}", "n=7", "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and result["data"]["query"] == {"n": ["7"]}
    job_id = result["job_id"]

    listing = cli("jobs", "--service", "stub", "--status", "succeeded", "--limit", "50")
    assert listing.returncode == 0 and job_id in listing.stdout

    one = cli("job", job_id)
    assert one.returncode == 0
    assert "succeeded" in one.stdout and "attempts:" in one.stdout
    assert TOKEN not in one.stdout

    stats = cli("stats")
    assert stats.returncode == 0
    row = next(line for line in stats.stdout.splitlines() if line.startswith("stub ") and " echo " in line)
    assert "%" in row  # success rate


def test_a_failing_job_is_one_line_and_non_zero(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=403))
    out = cli("call", "stub", "echo", f"key={key}", "--wait", "--timeout", "30")
    assert out.returncode == 1
    assert "failed: HTTP 403" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("call", "nosuch", "echo"), "unknown service (known: "),
        (("call", "stub", "echo", "key"), "expected key=value for each parameter"),
        (("call", "stub", "echo", "key=a", "n=x"), "n: must be an integer"),
        (("job", "no-such-id"), "no job with id no-such-id"),
    ],
)
def test_bad_input_is_one_clear_line(args: tuple[str, ...], message: str) -> None:
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_wait_that_runs_out_says_the_job_goes_on(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(delay=3))
    out = cli("call", "stub", "echo", f"key={key}", "--wait", "--timeout", "0.5")
    assert out.returncode == 1
    assert out.stderr.startswith("error: timed out waiting for the result (the job goes on")
    assert out.stderr.count("\n") == 1


def test_a_bad_number_in_the_environment_is_one_line_naming_it() -> None:
    assert cli("services", env=env_with(FLOWER_PORT="fivefivefive")).returncode == 0
    out = cli("flower", env=env_with(FLOWER_PORT="fivefivefive"))
    assert out.returncode == 2 and "argument --port: must be a number" in out.stderr
    assert "Traceback" not in out.stderr and "fivefivefive" not in out.stderr
    out = cli("services", env=env_with(RECEIVER_PORT="eighty"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "eighty" not in out.stderr
    assert out.stderr.startswith("error: invalid settings: RECEIVER_PORT: "), out.stderr


def test_services_lists_operations() -> None:
    out = cli("services")
    assert out.returncode == 0
    assert "stub (rest," in out.stdout and "echo: GET /echo/{key}" in out.stdout
    assert TOKEN not in out.stdout


def test_an_unreachable_database_is_one_line() -> None:
    from procs import env_with

    env = env_with(DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none")
    out = cli("jobs", env=env)
    assert out.returncode == 1
    assert out.stderr.startswith("error: OperationalError") and "Traceback" not in out.stderr


def test_a_broker_down_at_submit_is_one_line_and_leaves_no_job_queued(key: str) -> None:
    out = cli("call", "stub", "echo", f"key={key}", env=env_with(BROKER_URL="redis://127.0.0.1:1/0"))
    assert out.returncode == 2
    assert "could not queue the job: broker unavailable" in out.stderr and "Traceback" not in out.stderr
    m = re.search(r"job ([0-9a-f-]{36}) was not run", out.stderr)
    assert m is not None
    job = reads.get_job(m.group(1))
    assert job is not None and job["status"] == "failed" and "broker unavailable" in job["error"]


def test_a_ledger_down_at_submit_is_one_line_and_queues_nothing(stub: Stub, key: str) -> None:
    # A broker of its own that no worker reads: whatever the submit published would still be in it.
    broker = redis.Redis.from_url(SPARE_REDIS_URL)
    broker.flushdb()
    env = env_with(DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none", BROKER_URL=SPARE_REDIS_URL)
    out = cli("call", "stub", "echo", f"key={key}", env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("error: could not record the job: the ledger database is unavailable")
    assert "nothing was queued" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert broker.llen("integrations") == 0 and broker.dbsize() == 0
    assert stub.hits_for(key) == []


def test_a_ledger_never_migrated_says_what_to_run_on_sqlite_and_postgres(tmp_path: Any) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(DATABASE_URL, isolation_level="AUTOCOMMIT")
    empty = "empty_" + uuid.uuid4().hex[:8]
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {empty}"))
    try:
        for url in (
            f"sqlite:///{tmp_path}/new.db",
            make_url(DATABASE_URL).set(database=empty).render_as_string(False),
        ):
            out = cli("jobs", env=env_with(DATABASE_URL=url))
            assert out.returncode == 1
            assert out.stderr.strip() == "error: the ledger has no tables yet: run 'integrations migrate'"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {empty} WITH (FORCE)"))
        admin.dispose()


def test_stats_prints_the_median_and_95th_percentile_of_the_jobs_latencies(stub: Stub, key: str) -> None:
    # stub_stats is called by this test alone. Twenty answers, slowed by known delays (ms):
    delays = [40] * 9 + [60, 200] + [250] * 7 + [700, 1600]
    # Sorted, p50 lies halfway between the 10th and 11th (60 and 200): 130 ms; p95 at 18.05 of
    # 0..19, a twentieth of the way from 700 to 1600: 745 ms (interpolated, "inclusive"). The
    # mean (233.5), the 11th value (200), p90 (295) and the maximum (1600) are all elsewhere.
    stub.plan(key, *[Reply(delay=ms / 1000) for ms in delays])
    results = [call_service.delay("stub_stats", "echo", {"key": key}) for _ in delays]
    assert [r.get(timeout=60)["status"] for r in results] == ["succeeded"] * len(delays)

    out = cli("stats")
    assert out.returncode == 0, out.stderr
    header = out.stdout.splitlines()[0].split()
    assert header[:8] == [
        "SERVICE",
        "OPERATION",
        "COUNT",
        "SUCCEEDED",
        "FAILED",
        "SUCCESS",
        "P50_MS",
        "P95_MS",
    ]
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("stub_stats "))
    assert row[:6] == ["stub_stats", "echo", "20", "20", "0", "100%"]
    p50, p95 = float(row[6]), float(row[7])
    # Each latency is its delay plus the round trip on loopback (a few ms; 60 allowed).
    assert 130 <= p50 <= 190, row
    assert 745 <= p95 <= 805, row
