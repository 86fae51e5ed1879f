"""README claims with no other home: the ledger's migrations and `integrations migrate`, and
settings read from files (``NAME_FILE``) by whole processes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from celery import Celery
from conftest import DATABASE_URL, REDIS_URL, SPARE_REDIS_URL, free_port
from procs import BIN, cli, env_with, running, wait_for
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from stub import Stub
from tcp_proxy import TcpProxy

from integrations.ledger import reads
from integrations.ledger.migrate import upgrade
from integrations.ledger.models import Base

# ------------------------------------------------------------------------------------------------
# The migrations make exactly the models' schema
# ------------------------------------------------------------------------------------------------


def schema_differences(url: str) -> list[Any]:
    """What Alembic's autogenerate would change to bring the database at ``url`` to the models."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_the_migrations_make_the_models_schema_on_postgres() -> None:
    # The session's database, migrated to head by conftest like every deployment is.
    assert schema_differences(DATABASE_URL) == []


def test_the_migrations_make_the_models_schema_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    assert schema_differences(url) == []


# ------------------------------------------------------------------------------------------------
# `integrations migrate` waits, bounded, for the database
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_database() -> Iterator[URL]:
    """An empty database of its own beside the session's, dropped afterwards."""
    server = make_url(DATABASE_URL)
    fresh = server.set(database=f"{server.database}_migrate")
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{fresh.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{fresh.database}"'))
    try:
        yield fresh
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{fresh.database}" WITH (FORCE)'))
        admin.dispose()


def test_migrate_waits_for_a_database_that_comes_up_within_the_bound(fresh_database: URL) -> None:
    assert fresh_database.host and fresh_database.port
    with TcpProxy((fresh_database.host, fresh_database.port)) as proxy:
        proxy.cut()  # refused, as a database container still starting refuses
        url = fresh_database.set(port=proxy.port).render_as_string(hide_password=False)
        started = time.monotonic()
        migrate = subprocess.Popen(
            [str(BIN / "integrations"), "migrate"],
            env=env_with(DATABASE_URL=url, MIGRATE_WAIT=30),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(3)
            assert migrate.poll() is None, migrate.communicate()  # still waiting, not failed
            proxy.restore()
            out, err = migrate.communicate(timeout=60)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait(timeout=10)
    assert migrate.returncode == 0, err
    assert out.strip() == "ledger schema is up to date"
    assert 3 <= time.monotonic() - started < 40
    url = fresh_database.render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        assert {"jobs", "job_attempts", "events", "deliveries", "alembic_version"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()
    assert schema_differences(url) == []


def test_migrate_against_a_port_nothing_listens_on_fails_in_one_line_after_the_bound() -> None:
    port = free_port()  # bound and released: nothing listens there
    env = env_with(DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{port}/ledger", MIGRATE_WAIT=3)
    started = time.monotonic()
    out = cli("migrate", env=env)
    elapsed = time.monotonic() - started
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: the ledger database at 127.0.0.1:{port} did not accept a connection within 3 s "
        "(MIGRATE_WAIT): Connection refused"
    )
    assert 3 <= elapsed < 15, elapsed  # the bound, plus the interpreter's start


# ------------------------------------------------------------------------------------------------
# DATABASE_URL_FILE, BROKER_URL_FILE, RESULT_BACKEND_FILE
# ------------------------------------------------------------------------------------------------


def test_a_worker_and_a_submitter_given_only_the_file_forms_of_their_urls_work(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    # The broker on the spare Redis database (the session worker does not consume it); results
    # in the test database of the same Redis, apart from the broker; the ledger on Postgres.
    # Were a file ignored, its default would show: the filesystem broker (nothing would run the
    # job), results beside the broker, the ledger in SQLite under VAR_DIR.
    files = {"DATABASE_URL": DATABASE_URL, "BROKER_URL": SPARE_REDIS_URL, "RESULT_BACKEND": REDIS_URL}
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in files.items():
        (secrets / name.lower()).write_text(value + "\n")
    env = env_with(
        **{name: None for name in (*files, "COORDINATION_URL")},
        **{f"{name}_FILE": secrets / name.lower() for name in files},
        VAR_DIR=tmp_path / "var",
    )
    redis.Redis.from_url(SPARE_REDIS_URL).flushdb()
    cmd = [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "threads", "-c", "2", "--loglevel=INFO"]
    cmd += ["--hostname=files@%h", "--without-mingle", "--without-gossip"]
    log = tmp_path / "worker.log"
    with running(cmd, env, log):
        wait_for(lambda: "ready." in log.read_text(), 60, "the worker to start", log)
        spare = Celery(broker=SPARE_REDIS_URL)
        try:
            replies = spare.control.inspect(timeout=2).ping() or {}
        finally:
            spare.close()
        assert any(name.startswith("files@") for name in replies), replies  # it consumes the spare

        out = cli("call", "stub", "echo", f"key={key}", "--wait", "--timeout", "60", env=env, timeout=90)
        assert out.returncode == 0, out.stderr + log.read_text()[-2000:]
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and len(stub.hits_for(key)) == 1
    job = reads.get_job(result["job_id"])  # in the session's Postgres
    assert job is not None and job["status"] == "succeeded"
    assert redis.Redis.from_url(REDIS_URL).exists(f"celery-task-meta-{result['job_id']}")
    assert not redis.Redis.from_url(SPARE_REDIS_URL).exists(f"celery-task-meta-{result['job_id']}")
    assert not (tmp_path / "var" / "integrations.db").exists()
