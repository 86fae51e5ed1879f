"""The sql kind through the job path, against the machine's real Postgres, MariaDB and SQLite.

Postgres data lives in a schema of its own (``sqlkind``) in the test database; MariaDB's in
``sqlkind_*`` tables of its ``test`` database; SQLite's in a file under a temporary directory.
Each is made before the module and dropped after it. MariaDB that is not running fails the
module: nothing here skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from conftest import DATABASE_URL, MARIADB_URL, SQL_PG_PASSWORD
from procs import cli, wait_for
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from integrations import health
from integrations.errors import ConfigError, InvalidParams, PermanentError, TransientError
from integrations.ledger import reads
from integrations.services import get_services, load_services
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker", "pg_data", "maria_data", "lite_data")

PG_CONNINFO = make_url(DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def run(service: str, statement: str, **params: Any) -> dict[str, Any]:
    """Submit a job and wait for its result (raises the job's final error)."""
    out: dict[str, Any] = call_service.delay(service, statement, params).get(timeout=40)
    return out


def job_of(job_id: str) -> dict[str, Any]:
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None
    return job


def failed_job(service: str, statement: str, error: type[Exception], **params: Any) -> dict[str, Any]:
    r = call_service.delay(service, statement, params)
    with pytest.raises(error):
        r.get(timeout=40)
    return job_of(r.id)


# ---- the databases' test data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_data() -> Iterator[None]:
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute("drop schema if exists sqlkind cascade")
        conn.execute("create schema sqlkind")
        conn.execute(
            """create table sqlkind.customers (
                 id serial primary key, name text not null, email text unique not null,
                 born date, signed_up timestamptz, balance numeric(12, 2), ref uuid, photo bytea,
                 prefs jsonb, tags text[], tenure interval)"""
        )
        conn.execute(
            """insert into sqlkind.customers
                 (name, email, born, signed_up, balance, ref, photo, prefs, tags, tenure) values
                 ('Ada', 'ada@example.com', '1815-12-10', '2024-03-01 12:30:00+00', 1234.50,
                  '6f1c4b52-0d3e-4d35-9a55-3c3b9f2f1e01', '\\x00ff10', '{"lang": "en"}',
                  '{math,engines}', '2 days 03:00:00')"""
        )
        conn.execute("create table sqlkind.accounts (id int primary key, balance int not null)")
        conn.execute("insert into sqlkind.accounts values (1, 100), (2, 100)")
        conn.execute(
            """create function sqlkind.transfer(src int, dst int) returns int language plpgsql as $$
               begin
                 update sqlkind.accounts set balance = balance - 1 where id = src;
                 update sqlkind.accounts set balance = balance + 1 where id = dst;
                 return 1;
               end $$"""
        )
    yield
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute("drop schema sqlkind cascade")


def _maria() -> pymysql.connections.Connection[Any]:
    u = make_url(MARIADB_URL)
    try:
        return pymysql.connect(
            host=u.host, port=u.port or 3306, user=u.username, password=u.password or "", database=u.database
        )
    except pymysql.err.OperationalError as e:
        pytest.fail(f"MariaDB is not reachable at {u.host}:{u.port or 3306} ({e}); start it first")


@pytest.fixture(scope="module")
def maria_data() -> Iterator[None]:
    conn = _maria()
    with conn.cursor() as cur:
        cur.execute("drop table if exists sqlkind_customers")
        cur.execute(
            """create table sqlkind_customers (
                 id int auto_increment primary key, name varchar(100) not null,
                 email varchar(200) not null unique, born date, signed_up datetime,
                 balance decimal(12, 2), photo varbinary(100))"""
        )
        cur.execute(
            """insert into sqlkind_customers (name, email, born, signed_up, balance, photo)
               values ('Grace', 'grace@example.com', '1906-12-09', '2024-03-01 12:30:00', 99.95, x'00ff10')"""
        )
    conn.commit()
    yield
    with conn.cursor() as cur:
        cur.execute("drop table if exists sqlkind_customers")
    conn.close()


@pytest.fixture(scope="module")
def lite_data() -> Iterator[Path]:
    path = Path(os.environ["SQL_SQLITE_PATH"])
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "create table customers"
            " (id integer primary key, name text not null, email text unique, photo blob)"
        )
        conn.executemany(
            "insert into customers (name, email) values (?, ?)",
            [(f"c{i}", f"c{i}@example.com") for i in range(25)],
        )
    yield path
    for leftover in (path, path.with_name(path.name + "-journal")):
        leftover.unlink(missing_ok=True)


# ---- reads, writes, refusals ----------------------------------------------------------------


def test_postgres_rows_come_back_as_json_values() -> None:
    out = run("pg", "customer_values", id=1)
    assert out["status"] == "succeeded"
    (row,) = out["data"]["rows"]
    assert row == {
        "id": 1,
        "born": "1815-12-10",
        "signed_up": "2024-03-01T12:30:00+00:00",
        "balance": "1234.50",
        "ref": "6f1c4b52-0d3e-4d35-9a55-3c3b9f2f1e01",
        "photo": "AP8Q",  # base64 of 00 ff 10
        "prefs": {"lang": "en"},
        "tags": ["math", "engines"],
        "tenure": "PT183600S",
    }
    assert out["data"]["truncated"] is False
    assert job_of(out["job_id"])["meta"] == {"rows": 1}


def test_mariadb_rows_come_back_as_json_values() -> None:
    out = run("maria", "customer_values", id=1)
    (row,) = out["data"]["rows"]
    assert row == {
        "id": 1,
        "born": "1906-12-09",
        "signed_up": "2024-03-01T12:30:00",
        "balance": "99.95",
        "photo": "AP8Q",
    }


@pytest.mark.parametrize("service", ["pg", "maria", "lite"])
def test_a_declared_write_changes_the_database(service: str) -> None:
    email = f"w{uuid.uuid4().hex[:8]}@example.com"
    written = run(service, "add_customer", name="Wren", email=email)
    assert written["data"]["rows_affected"] == 1
    assert job_of(written["job_id"])["meta"]["rows_affected"] == 1
    found = run(service, "find_customer", email=email)
    assert [r["name"] for r in found["data"]["rows"]] == ["Wren"]


@pytest.mark.parametrize("service", ["pg", "maria", "lite"])
def test_a_read_statement_that_writes_is_refused_and_changes_nothing(service: str) -> None:
    email = f"r{uuid.uuid4().hex[:8]}@example.com"
    run(service, "add_customer", name="Before", email=email)
    job = failed_job(service, "rename_customer_in_read", PermanentError, name="After", email=email)
    assert job["attempts"] == 1
    assert job["error"].startswith("a read statement tried to write")
    assert [r["name"] for r in run(service, "find_customer", email=email)["data"]["rows"]] == ["Before"]


def test_parameters_are_bound_not_formatted() -> None:
    sneaky = "x' or '1'='1@example.com"
    out = run("pg", "find_customer", email=sneaky)
    assert out["data"]["rows"] == []  # bound as a value, the quote is just a character
    written = run("lite", "add_customer", name="Robert'); drop table customers;--", email=f"{uuid.uuid4()}@x")
    assert written["data"]["rows_affected"] == 1
    assert run("lite", "all_customers")["status"] == "succeeded"  # the table is still there


def test_params_are_checked_against_their_schema_before_anything_runs() -> None:
    with pytest.raises(InvalidParams, match="email: must be a valid email"):
        call_service.delay("pg", "find_customer", {"email": "not-an-address"})
    with pytest.raises(InvalidParams, match="n: fails maximum"):
        call_service.delay("pg", "series", {"n": 10**6})


# ---- limits ---------------------------------------------------------------------------------


def test_the_row_limit_truncates_and_the_job_says_so() -> None:
    out = run("pg", "series", n=1500)
    assert [r["g"] for r in out["data"]["rows"]] == list(range(1, 1001))
    assert out["data"]["truncated"] is True
    assert job_of(out["job_id"])["meta"] == {"rows": 1000, "truncated": True, "truncated_by": "max_rows"}
    lite = run("lite", "all_customers")  # max_rows: 10
    assert len(lite["data"]["rows"]) == 10 and lite["meta"]["truncated"] is True


@pytest.mark.parametrize(
    ("service", "statement", "params"),
    [
        ("pg_timeout", "sleep", {"seconds": 3}),
        ("maria", "sleep", {"seconds": 3}),
        ("lite", "count_forever", {}),
    ],
)
def test_a_statement_past_its_timeout_is_stopped_and_retried(
    service: str, statement: str, params: dict[str, Any]
) -> None:
    t0 = time.monotonic()
    job = failed_job(service, statement, TransientError, **params)
    # Two attempts of about 1 s each and one backoff of 1 s: the database stopped each statement.
    assert time.monotonic() - t0 < 8
    assert [a["outcome"] for a in job["attempts_log"]] == ["retrying", "failed"]
    assert job["error"] == "statement timed out after 1s"
    assert all(0.9 * 1000 <= a["latency_ms"] < 3000 for a in job["attempts_log"])


# ---- transient failures, retried by the job path ---------------------------------------------


def test_a_deadlock_is_retried_by_the_job_and_then_succeeds() -> None:
    with psycopg.connect(PG_CONNINFO) as blocker:
        # This session never runs the deadlock check first, so the job's statement is the victim.
        blocker.execute("set local deadlock_timeout = '10s'")
        blocker.execute("set local lock_timeout = '20s'")
        blocker.execute("update sqlkind.accounts set balance = balance where id = 2")
        r = call_service.delay("pg", "transfer", {"src": 1, "dst": 2})
        wait_for(lambda: _waiting_on_a_lock("sqlkind.transfer"), 15, "the job to wait for row 2")
        # Row 1 is the job's: the cycle closes, Postgres aborts the job's statement.
        blocker.execute("update sqlkind.accounts set balance = balance where id = 1")
        blocker.commit()
    out = r.get(timeout=40)
    log = job_of(out["job_id"])["attempts_log"]
    assert [a["outcome"] for a in log] == ["retrying", "succeeded"]
    assert log[0]["error"].startswith("deadlock (40P01): deadlock detected")
    assert out["data"]["rows"] == [{"moved": 1}]


def _waiting_on_a_lock(query: str) -> bool:
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and query like %s",
            (f"%{query}%",),
        ).fetchone()
    return bool(row and row[0])


def test_postgres_cut_and_restored_the_job_retries_and_succeeds() -> None:
    target = (os.environ["SQL_PG_HOST"], int(os.environ["SQL_PG_PORT"]))
    with TcpProxy(target, port=int(os.environ["SQL_PG_PROXY_PORT"])) as proxy:
        assert run("pg_cut", "find_customer", email="ada@example.com")["data"]["rows"]  # a pooled connection
        proxy.cut()  # the pooled connection drops, new ones are refused
        r = call_service.delay("pg_cut", "find_customer", {"email": "ada@example.com"})
        wait_for(lambda: len(job_of(r.id)["attempts_log"]) >= 2, 20, "two failed attempts")
        proxy.restore()
        out = r.get(timeout=40)
    log = job_of(out["job_id"])["attempts_log"]
    assert [a["outcome"] for a in log[:-1]] == ["retrying"] * (len(log) - 1)
    assert log[-1]["outcome"] == "succeeded"
    assert all(a["error"].startswith("connection failed") for a in log[:-1])
    assert [row["name"] for row in out["data"]["rows"]] == ["Ada"]


# ---- permanent failures, credentials, the guard ---------------------------------------------


def test_a_syntax_error_fails_at_once_with_the_drivers_message_and_no_password() -> None:
    job = failed_job("pg", "misspelt", PermanentError)
    assert job["attempts"] == 1
    assert job["error"] == 'syntax or permission error (42601): syntax error at or near "selec"'
    assert job["meta"] == {"sqlstate": "42601"}
    assert SQL_PG_PASSWORD not in json.dumps(job, default=str)


def test_an_integrity_error_is_permanent_and_does_not_echo_the_value() -> None:
    email = f"dup{uuid.uuid4().hex[:8]}@example.com"
    run("maria", "add_customer", name="One", email=email)
    job = failed_job("maria", "add_customer", PermanentError, name="Two", email=email)
    assert job["attempts"] == 1 and job["meta"] == {"errno": 1062}
    assert job["error"].startswith("database error (1062): Duplicate entry")
    assert email not in job["error"]


def test_the_ssrf_guard_refuses_a_loopback_database_unless_allowed() -> None:
    job = failed_job("pg_guarded", "find_customer", PermanentError, email="ada@example.com")
    assert "not a public address" in job["error"] and job["attempts"] == 1
    # Allowed by network: connected to the address the guard judged for "localhost".
    out = run("pg_allowed", "server_address")
    assert out["data"]["rows"][0]["address"] in ("127.0.0.1", "::1")


def test_health_is_select_1_on_each_backend() -> None:
    services = get_services()
    for name in ("pg", "maria", "lite"):
        outcome = health.check(services[name])
        assert outcome.ok and outcome.error is None, name
    guarded = health.check(services["pg_guarded"])
    assert not guarded.ok and "not a public address" in (guarded.error or "")


def test_the_cli_lists_and_calls_statements_without_showing_the_url() -> None:
    listing = cli("services")
    assert listing.returncode == 0, listing.stderr
    assert "pg (sql, postgresql, 2 writing, timeout 2s, at most 1000 rows)" in listing.stdout
    assert "  find_customer: read: A customer by e-mail address." in listing.stdout
    assert SQL_PG_PASSWORD not in listing.stdout
    out = cli("call", "pg", "find_customer", "email=ada@example.com", "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data"]["rows"][0]["name"] == "Ada"


# ---- the services file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ({"sql": "select :a, :b", "params": {"a": "str"}}, "sql uses :b, not declared in params"),
        ({"sql": "select :a", "params": {"a": "str", "c": "int"}}, "params: c not used in sql"),
        ({"sql": "select 1", "mode": "delete"}, "mode: Input should be 'read' or 'write'"),
    ],
)
def test_statements_and_their_params_must_match(
    tmp_path: Path, statement: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_services(_services_file(tmp_path, {"url": "sqlite:///x.db", "statements": {"s": statement}}))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("oracle://scott:tiger-secret@db/x", "unsupported database"),
        ("postgresql+psycopg2://u:tiger-secret@db/x", "postgresql is spoken with psycopg"),
        ("not a url tiger-secret", "not a database URL"),
    ],
)
def test_a_bad_url_is_named_but_never_shown(tmp_path: Path, url: str, message: str) -> None:
    spec = {"url": url, "statements": {"s": {"sql": "select 1"}}}
    with pytest.raises(ConfigError, match=message) as e:
        load_services(_services_file(tmp_path, spec))
    assert "tiger-secret" not in str(e.value)


def test_a_health_check_of_its_own_is_for_kinds_that_have_one(tmp_path: Path) -> None:
    spec = {"url": "sqlite:///x.db", "health": {"interval": 60}, "statements": {"s": {"sql": "select 1"}}}
    assert load_services(_services_file(tmp_path, spec))["db"].health is not None
    rest = {"kind": "rest", "base_url": "https://api.example.com", "health": {"interval": 60}}
    rest["operations"] = {"ping": {"path": "/ping"}}
    with pytest.raises(ConfigError, match="health: this kind has no check of its own"):
        load_services(_services_file(tmp_path, rest))


def test_a_statement_without_a_description_shows_its_sql_to_the_agent() -> None:
    schema = get_services()["pg"].catalog()["series"].parameters
    assert schema["description"] == "Runs this read statement: select g from generate_series(1, :n) as g"
    assert schema["properties"] == {"n": {"type": "integer", "minimum": 1, "maximum": 100000}}
    assert schema["required"] == ["n"] and schema["additionalProperties"] is False


def _services_file(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(json.dumps({"services": {"db": {"kind": "sql", **spec}}}))
    return path
