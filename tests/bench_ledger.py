"""`make bench-ledger`: `integrations stats`, `health` and `prune` on a ledger of a million jobs.

Fills a database of its own (``BENCH_LEDGER_DATABASE_URL``, default the Postgres database
``bench_ledger``, dropped and made again) with generated rows, written with COPY: jobs spread
over the last 90 days (``BENCH_LEDGER_DAYS``) across 20 services and 5 operations each, mostly
succeeded, some failed after three attempts, the last minutes still queued, running or waiting;
one attempt row per try; 7 days of health checks of every service each 30 s; events with their
handlings, deliveries with their attempts, breaker events. Then ``VACUUM ANALYZE``, as
autovacuum would after such a load, and it times:

- ``jobs.stats()`` in-process, over the whole ledger and over windows (1 h, 7 d, 30 d);
- the ``integrations stats`` command, a process of its own as an operator runs it;
- ``jobs.health_of()`` for the 20 services (counts of the last 24 h, as the command's default),
  and the ``integrations health`` command;
- ``integrations prune --older-than 30d`` (two thirds of the ledger), with its longest batch.

``--sqlite`` does the same on a SQLite file (multi-row inserts instead of COPY). Figures go to
``bench-ledger-results.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent

PG = os.environ.get("BENCH_LEDGER_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench_ledger")
ROWS = int(os.environ.get("BENCH_LEDGER_ROWS", "1000000"))
DAYS = int(os.environ.get("BENCH_LEDGER_DAYS", "90"))
REPEAT = int(os.environ.get("BENCH_LEDGER_REPEAT", "5"))

SERVICES = [f"svc{i:02d}" for i in range(18)] + ["llm_openai", "llm_anthropic"]
OPERATIONS = ["get", "list", "create", "update", "delete"]
STATUSES_OPEN = ["queued", "running", "retrying", "deferred"]
AGENTS = [f"agent-{i}" for i in range(7)]


def _uuid(rnd: random.Random) -> str:
    h = f"{rnd.getrandbits(128):032x}"  # os.urandom is slow on some VMs; ids need not be secret here
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def job_rows(n: int, now: dt.datetime, days: int, seed: int = 15) -> Iterator[tuple[Any, ...]]:
    """``n`` jobs created uniformly over the last ``days`` days, oldest first (as a ledger grows),
    as tuples in :data:`JOB_COLUMNS` order. Their attempts are made from them in SQL."""
    rnd = random.Random(seed)
    span = days * 86400.0
    step = span / n
    excerpt = '{"id": 1234567, "name": "a typical answer, cut to the excerpt the ledger keeps"}' * 3
    params = '{"key": "value", "n": 1}'
    for i in range(n):
        created = now - dt.timedelta(seconds=span - i * step)
        service = SERVICES[i % len(SERVICES)] if rnd.random() < 0.7 else SERVICES[rnd.randrange(4)]
        operation = OPERATIONS[rnd.randrange(5)]
        agent = AGENTS[i % len(AGENTS)]
        roll = rnd.random()
        if (now - created).total_seconds() < 120 and roll < 0.5:  # the last minutes: in flight
            status = STATUSES_OPEN[rnd.randrange(4)]
            started = None if status == "queued" else created
            tries = 0 if status == "queued" else 1
            yield (
                _uuid(rnd), service, operation, params, None, status, tries, None, None, None,
                None, created, created, started, None, None, None, agent, None, None, None,
            )  # fmt: skip
            continue
        latency = round(math.exp(rnd.gauss(4.8, 0.6)), 2)  # median ~120 ms, p95 ~320 ms
        failed = roll < 0.05
        tries = 3 if failed else 1
        finished = created + dt.timedelta(milliseconds=latency + (6000 if failed else 3))
        llm = service.startswith("llm_")
        yield (
            _uuid(rnd), service, operation, params, f"idem-{i}" if i % 10 == 0 else None,
            "failed" if failed else "succeeded", tries, 503 if failed else 200, latency,
            "HTTP 503 Service Unavailable" if failed else None, excerpt, created, finished,
            created, finished, None, None, agent, None,
            rnd.randrange(200, 4000) if llm else None, rnd.randrange(20, 800) if llm else None,
        )  # fmt: skip


JOB_COLUMNS = (
    "id", "service", "operation", "params", "idempotency_key", "status", "attempts", "status_code",
    "latency_ms", "error", "response_excerpt", "created_at", "updated_at", "started_at", "finished_at",
    "next_attempt_at", "replay_of", "agent", "meta", "input_tokens", "output_tokens",
)  # fmt: skip
#: One attempt row per try of each finished job, made in SQL from the jobs (portable SQL).
ATTEMPTS_FROM_JOBS = """
INSERT INTO job_attempts (job_id, number, outcome, status_code, latency_ms, started_at, finished_at)
SELECT j.id, k.n, j.status, j.status_code, j.latency_ms, j.started_at, j.finished_at
FROM jobs j JOIN (SELECT 1 AS n UNION ALL SELECT 2 UNION ALL SELECT 3) k ON k.n <= j.attempts
WHERE j.finished_at IS NOT NULL
"""


def other_rows(
    n: int, now: dt.datetime, days: int
) -> dict[str, tuple[Sequence[str], Callable[[], Iterator[tuple[Any, ...]]]]]:
    """Health checks (7 days, every 30 s, each service), events (n/10) with one or two handlings,
    one endpoint with deliveries (n/20) and their attempts, breaker events (n/1000)."""
    span = days * 86400.0
    n_events, n_deliveries, n_breaker = n // 10, n // 20, max(n // 1000, 10)
    rnd = random.Random(16)
    event_ids = [_uuid(rnd) for _ in range(n_events)]
    delivery_ids = [f"msg_{rnd.getrandbits(128):032x}" for _ in range(n_deliveries)]

    def at(i: int, count: int) -> dt.datetime:
        return now - dt.timedelta(seconds=span - i * span / count)

    def health() -> Iterator[tuple[Any, ...]]:
        checks = 7 * 86400 // 30
        for k in range(checks):
            t = now - dt.timedelta(seconds=(checks - k) * 30)
            for s, service in enumerate(SERVICES):
                ok = (k + s) % 97 != 0
                yield service, ok, 200 if ok else 503, 12.5, None if ok else "HTTP 503", t

    def events() -> Iterator[tuple[Any, ...]]:
        for i, eid in enumerate(event_ids):
            t = at(i, n_events)
            yield eid, "github", "push", f"d-{i}", '{"ref": "refs/heads/main"}', t, t

    def handlings() -> Iterator[tuple[Any, ...]]:
        for i, eid in enumerate(event_ids):
            t = at(i, n_events)
            for h in ("agent.on_push", "agent.audit")[: 1 + i % 2]:
                yield eid, h, "succeeded", 1, t, t, t

    def endpoint() -> Iterator[tuple[Any, ...]]:
        yield (
            "ep_bench",
            "https://hooks.example.com/x",
            "whsec_x",
            '["*"]',
            True,
            (now - dt.timedelta(days=days)),
        )

    def deliveries() -> Iterator[tuple[Any, ...]]:
        for i, did in enumerate(delivery_ids):
            t = at(i, n_deliveries)
            yield did, "ep_bench", "job.succeeded", '{"n": 1}', "succeeded", 1, t, t, t

    def delivery_attempts() -> Iterator[tuple[Any, ...]]:
        for i, did in enumerate(delivery_ids):
            yield did, 1, True, 200, 15.0, (at(i, n_deliveries))

    def breaker() -> Iterator[tuple[Any, ...]]:
        for i in range(n_breaker):
            yield (
                SERVICES[i % len(SERVICES)],
                "open" if i % 2 == 0 else "closed",
                "5 failures",
                (at(i, n_breaker)),
            )

    made = {
        "health_checks": health,
        "events": events,
        "event_handlings": handlings,
        "endpoints": endpoint,
        "deliveries": deliveries,
        "delivery_attempts": delivery_attempts,
        "breaker_events": breaker,
    }
    return {table: (OTHER_COLUMNS[table], rows) for table, rows in made.items()}


OTHER_COLUMNS = {
    "health_checks": ("service", "ok", "status_code", "latency_ms", "error", "checked_at"),
    "events": ("id", "source", "event_type", "delivery_id", "payload", "received_at", "dispatched_at"),
    "event_handlings": (
        "event_id", "handler", "status", "attempts", "created_at", "updated_at", "finished_at",
    ),
    "endpoints": ("id", "url", "secret", "event_types", "enabled", "created_at"),
    "deliveries": (
        "id", "endpoint_id", "event_type", "body", "status", "attempts", "created_at", "updated_at",
        "finished_at",
    ),
    "delivery_attempts": ("delivery_id", "number", "ok", "status_code", "duration_ms", "at"),
    "breaker_events": ("service", "state", "reason", "at"),
}  # fmt: skip


def prepare(url: str) -> None:
    """An empty database at ``url`` (dropped first), migrated to head."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from integrations.ledger.migrate import upgrade

    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        Path(u.database or "").unlink(missing_ok=True)
    else:
        admin = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{u.database}"'))
        admin.dispose()
    upgrade(url)


def fill_postgres(url: str, n: int, now: dt.datetime, days: int) -> None:
    """COPY the generated rows in and make the attempts in SQL, in one transaction; ANALYZE."""
    import psycopg

    with psycopg.connect(_conninfo(url)) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY jobs ({', '.join(JOB_COLUMNS)}) FROM STDIN") as copy:
                for row in job_rows(n, now, days):
                    copy.write_row(row)
            cur.execute(ATTEMPTS_FROM_JOBS)
            for table, (columns, rows) in other_rows(n, now, days).items():
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows():
                        copy.write_row(row)
        conn.commit()
        conn.execute("ANALYZE")


def vacuum_postgres(url: str) -> None:
    """What autovacuum does after such a load: the visibility map the index-only scans need."""
    import psycopg

    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def fill_sqlite(url: str, n: int, now: dt.datetime, days: int, chunk: int = 10000) -> None:
    """Multi-row INSERTs, the values as SQLAlchemy stores them (UTC datetimes without zone)."""
    import sqlite3

    from sqlalchemy.engine import make_url

    def plain(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            return v.astimezone(dt.UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return int(v) if isinstance(v, bool) else v

    conn = sqlite3.connect(make_url(url).database or "")
    try:

        def load(table: str, columns: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
            marks = ", ".join("?" * len(columns))
            q = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608 (our names)
            batch: list[tuple[Any, ...]] = []
            for row in rows:
                batch.append(tuple(map(plain, row)))
                if len(batch) == chunk:
                    conn.executemany(q, batch)
                    batch = []
            conn.executemany(q, batch)

        load("jobs", JOB_COLUMNS, job_rows(n, now, days))
        conn.execute(ATTEMPTS_FROM_JOBS)
        for table, (columns, rows) in other_rows(n, now, days).items():
            load(table, columns, rows())
        conn.commit()
        conn.execute("ANALYZE")
    finally:
        conn.close()


def timed(fn: Callable[[], object], repeat: int = REPEAT) -> dict[str, Any]:
    """Median and spread (ms) of ``repeat`` runs of ``fn``."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return {
        "median_ms": round(statistics.median(runs), 1),
        "min_ms": round(min(runs), 1),
        "max_ms": round(max(runs), 1),
    }


def command(*args: str, env: dict[str, str], repeat: int = REPEAT) -> dict[str, Any]:
    """``integrations ARGS`` as an operator runs it (a process of its own), timed end to end."""

    def run() -> None:
        out = subprocess.run(
            [str(BIN / "integrations"), *args], env=env, capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0:
            raise SystemExit(f"bench-ledger: integrations {' '.join(args)} failed: {out.stderr.strip()}")

    return timed(run, repeat)


def services_file(folder: Path) -> Path:
    """The generated services, each with a health check, so `integrations health` shows 20."""
    lines = ["services:"]
    for name in SERVICES:
        lines += [
            f"  {name}:",
            "    base_url: https://api.example.com",
            "    health: {path: /health, interval: 30}",
        ]
        lines += ["    operations:", *(f"      {op}: {{method: GET, path: /{op}}}" for op in OPERATIONS)]
    path = folder / "services.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-ledger-results.json")
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--sqlite", action="store_true", help="a SQLite file instead of Postgres")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    url = f"sqlite:///{tmp / 'ledger.db'}" if args.sqlite else PG
    env = {**os.environ, "DATABASE_URL": url, "SERVICES_FILE": str(services_file(tmp)), "VAR_DIR": str(tmp)}
    os.environ.update(env)
    from integrations.ledger import jobs
    from integrations.ledger.models import utcnow

    now = utcnow()
    print(f"bench-ledger: {args.rows:,} jobs over {DAYS} days in {'SQLite' if args.sqlite else 'Postgres'}, "
          f"{os.cpu_count()} CPUs, {REPEAT} runs each", flush=True)  # fmt: skip
    prepare(url)
    t0 = time.perf_counter()
    (fill_sqlite if args.sqlite else fill_postgres)(url, args.rows, now, DAYS)
    out: dict[str, Any] = {
        "rows": args.rows,
        "days": DAYS,
        "backend": "sqlite" if args.sqlite else "postgresql",
    }
    out["fill_s"] = round(time.perf_counter() - t0, 1)
    print(f"  filled in {out['fill_s']} s", flush=True)

    def since(span: dt.timedelta | None) -> Callable[[], object]:
        return lambda: jobs.stats(None if span is None else utcnow() - span)

    windows = {
        "all": None,
        "1h": dt.timedelta(hours=1),
        "7d": dt.timedelta(days=7),
        "30d": dt.timedelta(days=30),
    }
    if not args.sqlite:
        out["stats_before_vacuum"] = timed(since(None), 1)
        vacuum_postgres(url)
    out["stats"] = {name: timed(since(span)) for name, span in windows.items()}
    out["health_of_20"] = timed(lambda: jobs.health_of(SERVICES, since=utcnow() - dt.timedelta(hours=24)))
    out["command_startup"] = command("--help", env=env)
    out["command"] = {
        "stats": command("stats", env=env),
        "stats --since 1h": command("stats", "--since", "1h", env=env),
        "stats --since 7d": command("stats", "--since", "7d", env=env),
        "health": command("health", env=env),
    }
    for name, figures in out["stats"].items():
        print(f"  jobs.stats({name}): {figures['median_ms']} ms ({figures['min_ms']}-{figures['max_ms']})")
    print(f"  jobs.health_of(20 services): {out['health_of_20']['median_ms']} ms")
    for name, figures in out["command"].items():
        print(f"  integrations {name}: {figures['median_ms']} ms end to end")
    print(f"  (the interpreter's start and imports alone: {out['command_startup']['median_ms']} ms)")

    t0 = time.perf_counter()
    pruned = subprocess.run([str(BIN / "integrations"), "prune", "--older-than", "30d"], env=env,
                            capture_output=True, text=True, timeout=3600)  # fmt: skip
    out["prune_30d_s"] = round(time.perf_counter() - t0, 1)
    out["prune_output"] = pruned.stdout.strip() or pruned.stderr.strip()
    print(f"  integrations prune --older-than 30d: {out['prune_30d_s']} s: {out['prune_output']}")
    out["stats_after_prune"] = {"all": timed(since(None))}
    print(f"  jobs.stats(all) after the prune: {out['stats_after_prune']['all']['median_ms']} ms")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
