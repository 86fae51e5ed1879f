"""Real processes under load and under faults: the global rate limit across worker processes, and
200 jobs in flight while a worker node is SIGKILLed, Redis comes back empty, or Postgres is
unreachable for 10 seconds.

Each test starts its own ``redis-server`` (broker, results and coordination) on a free port and
its own ``celery -A tasks worker`` processes; the ledger is the session's Postgres database. In
the fault tests a subprocess plays beat's part: it calls ``requeue_stuck_jobs()`` every second.
Each fault test ends with every job succeeded and, per job (the ``Idempotency-Key`` header the
stub records), no two upstream requests overlapping in time. A job may run more than once (its
outcome was lost with the fault), never twice at once; how many did is printed (``pytest -rP``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import DATABASE_URL, free_port, most_in_window
from procs import BIN, ROOT, cli, env_with, python, running, wait_for
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from stub import Hit, Reply, Stub
from tcp_proxy import TcpProxy

from integrations.ledger import jobs as ledger
from integrations.ledger import reads
from integrations.ledger.db import get_engine
from integrations.ledger.models import TERMINAL, JobStatus

FAULT_SERVICES = ROOT / "tests" / "fault_services.yaml"
JOBS = 200

#: Short bounds, so lost jobs come back within seconds: queued jobs are re-published after 5 s,
#: running ones after max(5, 8 + 10) = 18 s, retrying ones after max(5, 10 + 10) = 20 s.
FAULT_SETTINGS: dict[str, Any] = {
    "STUCK_AFTER": 5,
    "TASK_SOFT_TIME_LIMIT": 5,
    "TASK_TIME_LIMIT": 8,
    "MAX_COUNTDOWN": 10,
    "DEFER_COUNTDOWN_MAX": 10,
    "VISIBILITY_TIMEOUT": 60,
    "TASK_EVENTS": "false",
}

SUBMIT = """
import json
from tasks import call_service
ids = [call_service.delay({service!r}, "echo", {{"key": {key!r}}}).id for _ in range({n})]
print(json.dumps(ids))
"""

# Beat's part: the sweeper every second. It outlives every exception (the database or the
# broker may be gone for a while) and says what it did, one line each time.
SWEEPER = """
import time
from tasks.maintenance import requeue_stuck_jobs
while True:
    try:
        n = requeue_stuck_jobs()
        if n:
            print("requeued", n, flush=True)
    except Exception as e:
        print("sweep failed:", type(e).__name__, flush=True)
    time.sleep(1)
"""


# ------------------------------------------------------------------------------------------------
# Servers and processes
# ------------------------------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` of the test's own, without persistence: a restart comes back empty."""

    def __init__(self, port: int, logs: Path) -> None:
        self.port = port
        self.logs = logs
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = self.logs / f"redis-{self.starts}.log"
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            wait_for(lambda: client.ping(), 15, f"redis-server on port {self.port}", log)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing saved."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def dbsize(self) -> int:
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return int(client.dbsize())
        finally:
            client.close()


@contextlib.contextmanager
def redis_server(logs: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), logs)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def stack_env(redis_url: str, database_url: str = DATABASE_URL, **settings: Any) -> dict[str, str]:
    """The environment of every process of one test: its Redis for everything Celery and the
    coordination keep, and the ledger at ``database_url``."""
    return env_with(
        BROKER_URL=redis_url,
        RESULT_BACKEND=redis_url,
        COORDINATION_URL=None,  # defaults to the broker
        DATABASE_URL=database_url,
        **settings,
    )


@contextlib.contextmanager
def worker_nodes(
    names: list[str], env: dict[str, str], logs: Path, pool: list[str]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``celery -A tasks worker`` nodes, each in its own process group; all ready on entry."""
    with contextlib.ExitStack() as stack:
        procs: list[subprocess.Popen[bytes]] = []
        for name in names:
            cmd = [str(BIN / "celery"), "-A", "tasks", "worker", *pool, f"--hostname={name}@%h"]
            cmd.append("--loglevel=INFO")
            procs.append(stack.enter_context(running(cmd, env, logs / f"worker-{name}.log")))
        for name in names:
            log = logs / f"worker-{name}.log"
            wait_for(functools.partial(_ready, log), 90, f"worker {name} to start", log)
        yield procs


def _ready(log: Path) -> bool:
    return "ready." in log.read_text(errors="replace")


@contextlib.contextmanager
def sweeper(env: dict[str, str], logs: Path) -> Iterator[Path]:
    log = logs / "sweeper.log"
    with running([sys.executable, "-c", SWEEPER], env, log):
        yield log


@contextlib.contextmanager
def beat(env: dict[str, str], logs: Path) -> Iterator[Path]:
    """Real ``celery beat``, its sweepers every SWEEP_INTERVAL seconds (set short by the test)."""
    log = logs / "beat.log"
    cmd = [
        str(BIN / "celery"),
        "-A",
        "tasks",
        "beat",
        f"--schedule={logs / 'beat-schedule'}",
        "--loglevel=INFO",
    ]
    with running(cmd, env, log):
        wait_for(lambda: "beat: Starting" in log.read_text(errors="replace"), 60, "beat to start", log)
        yield log


def submit(service: str, key: str, n: int, env: dict[str, str]) -> list[str]:
    """Submit ``n`` jobs from another process, as an agent would; their ids."""
    out = python(SUBMIT.format(service=service, key=key, n=n), env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    ids: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(ids)) == n
    return ids


# ------------------------------------------------------------------------------------------------
# What the ledger and the stub saw
# ------------------------------------------------------------------------------------------------


def wait_terminal(ids: list[str], timeout: float, logs: list[Path]) -> dict[str, dict[str, Any]]:
    """Poll the ledger until every job in ``ids`` is succeeded or failed; their rows."""
    pending = set(ids)
    rows: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for job_id in list(pending):
            job = reads.get_job(job_id)
            if job is not None and job["status"] in TERMINAL:
                rows[job_id] = job
                pending.discard(job_id)
        if not pending:
            break
        if time.monotonic() > deadline:
            statuses: dict[str, int] = defaultdict(int)
            for job_id in pending:
                job = reads.get_job(job_id)
                statuses[str(job["status"]) if job else "missing"] += 1
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
            raise AssertionError(
                f"{len(pending)} of {len(ids)} jobs not finished after {timeout}s: {dict(statuses)}\n{tails}"
            )
        time.sleep(0.5)
    return rows


def executions(stub: Stub, key: str, ids: list[str]) -> dict[str, list[Hit]]:
    """The stub's requests for ``key``, per job (the Idempotency-Key header), oldest first; once
    every request has been answered."""
    wait_for(lambda: all(h.done for h in stub.hits_for(key)), 10, "the stub to answer every request")
    by_job: dict[str, list[Hit]] = defaultdict(list)
    for hit in stub.hits_for(key):
        by_job[hit.headers.get("idempotency-key", "")].append(hit)
    assert set(by_job) == set(ids), "every request names one of the jobs, and every job made one"
    for hits in by_job.values():
        hits.sort(key=lambda h: h.at)
    return by_job


def assert_never_concurrent(by_job: dict[str, list[Hit]]) -> int:
    """No job had two requests upstream at once. Returns how many jobs ran more than once."""
    for job_id, hits in by_job.items():
        for first, second in itertools.pairwise(hits):
            assert second.at >= first.done, (
                f"job {job_id} ran twice at once: a request at {second.at:.3f} while the one"
                f" at {first.at:.3f} was answered only at {first.done:.3f}"
            )
    return sum(len(hits) > 1 for hits in by_job.values())


def assert_all_succeeded(rows: dict[str, dict[str, Any]]) -> None:
    failed = {k: (r["status"], r["error"]) for k, r in rows.items() if r["status"] != JobStatus.SUCCEEDED}
    assert not failed, f"{len(failed)} jobs did not succeed, e.g. {list(failed.items())[:3]}"


def count_lines(path: Path, needle: str) -> int:
    return sum(needle in line for line in path.read_text(errors="replace").splitlines())


def requeued(sweeper_log: Path) -> int:
    lines = sweeper_log.read_text(errors="replace").splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith("requeued "))


def report(test: str, **facts: Any) -> None:
    print(f"\n[{test}] " + ", ".join(f"{k}={v}" for k, v in facts.items()))


# ------------------------------------------------------------------------------------------------
# 1. The global rate limit, across four worker processes
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_the_global_rate_limit_holds_across_four_worker_processes(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    # stub_global: 20/s, burst 5. Four nodes of four threads each (-P threads -c 4): sixteen
    # callers in four processes, all taking their slots from the one limiter in Redis.
    n, rate, burst = 400, 20, 5
    with redis_server(tmp_path) as server:
        env = stack_env(server.url, SERVICES_FILE=ROOT / "tests" / "services.yaml")
        names = [f"rate{i}" for i in range(4)]
        with worker_nodes(names, env, tmp_path, ["-P", "threads", "-c", "4"]):
            started = time.monotonic()
            ids = submit("stub_global", key, n, env)
            submitted = time.monotonic() - started
            logs = [tmp_path / f"worker-{name}.log" for name in names]
            wait_for(lambda: len(stub.hits_for(key)) >= n, 90, f"{n} requests at the stub", logs[0])
            rows = wait_terminal(ids, 30, logs)
    assert_all_succeeded(rows)
    hits = stub.hits_for(key)
    assert len(hits) == n  # one request a job: nothing failed, nothing ran twice
    times = sorted(h.at for h in hits)
    (tmp_path / "arrivals.txt").write_text("".join(f"{t - times[0]:.4f}\n" for t in times))
    busiest = most_in_window(times)
    span = times[-1] - times[0]
    report(
        "rate limit",
        submit_s=round(submitted, 1),
        busiest_second=busiest,
        span_s=round(span, 2),
        expected_span_s=(n - burst) / rate,
    )
    # What the upstream counts: never more than burst + rate calls in any one-second window
    # (the limiter plans its grants so that calls up to RATE_LIMIT_MARGIN, 0.2 s, late still
    # keep to it), and never faster over the whole run than the rate allows, less that margin.
    # The upper bound on the span only says the limiter does not stall.
    assert busiest <= burst + rate
    assert (n - burst) / rate - 0.2 <= span <= 2 * n / rate


# ------------------------------------------------------------------------------------------------
# 2. Faults while 200 jobs are in flight
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_worker_node_killed_mid_flight_loses_no_job_and_runs_none_twice_at_once(
    broker: str, tmp_path: Path, stub: Stub, key: str, request: pytest.FixtureRequest
) -> None:
    stub.plan(key, *[Reply(delay=0.2)] * (2 * JOBS))
    with redis_server(tmp_path) as server:
        # Real beat: its sweepers run every second here (SWEEP_INTERVAL), on the survivor.
        env = stack_env(server.url, SERVICES_FILE=FAULT_SERVICES, SWEEP_INTERVAL=1, **FAULT_SETTINGS)
        if broker == "rabbitmq":  # a vhost of the test's own; results and coordination stay in Redis
            env.update(BROKER_URL=request.getfixturevalue("rabbitmq_vhost")[1], COORDINATION_URL=server.url)
        names = ["doomed", "survivor"]
        logs = [tmp_path / f"worker-{name}.log" for name in names]
        with (
            worker_nodes(names, env, tmp_path, ["-P", "prefork", "-c", "2"]) as (doomed, _),
            beat(env, tmp_path) as beat_log,
        ):
            ids = submit("flaky", key, JOBS, env)
            wait_for(lambda: len(stub.hits_for(key)) >= JOBS // 4, 60, "a quarter of the jobs", logs[0])
            os.killpg(doomed.pid, signal.SIGKILL)
            killed = time.monotonic()
            doomed.wait(timeout=10)
            unanswered = sum(1 for h in stub.hits_for(key) if not h.done)
            rows = wait_terminal(ids, 120, [*logs, beat_log])
            recovered = time.monotonic() - killed
            requeues = sum(
                int(line.split("re-queued ")[1].split()[0])
                for line in logs[1].read_text(errors="replace").splitlines()
                if "re-queued " in line and "stuck jobs" in line
            )
    assert_all_succeeded(rows)
    # Both nodes had taken their share of the jobs before one was killed, and the kill lost
    # work: calls in flight, or jobs the sweeper had to publish again.
    assert all(count_lines(log, "succeeded in") > 0 for log in logs)
    assert unanswered + requeues >= 1
    by_job = executions(stub, key, ids)
    twice = assert_never_concurrent(by_job)
    # Only a job in flight on the killed node (two processes) can have run twice.
    assert twice <= 2
    report(
        "worker SIGKILL",
        broker=broker,
        requests_unanswered_at_kill=unanswered,
        jobs_done_by_killed_node=count_lines(logs[0], "succeeded in"),
        jobs_run_more_than_once=twice,
        requests=sum(map(len, by_job.values())),
        sweeper_requeues=requeues,
        all_done_s_after_kill=round(recovered, 1),
    )


@pytest.mark.timeout(240)
def test_redis_restarted_empty_mid_flight_loses_no_job_and_runs_none_twice_at_once(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    stub.plan(key, *[Reply(delay=0.2)] * (2 * JOBS))
    with redis_server(tmp_path) as server:
        env = stack_env(server.url, SERVICES_FILE=FAULT_SERVICES, **FAULT_SETTINGS)
        names = ["red1", "red2"]
        logs = [tmp_path / f"worker-{name}.log" for name in names]
        with (
            worker_nodes(names, env, tmp_path, ["-P", "prefork", "-c", "2"]) as nodes,
            sweeper(env, tmp_path) as sweeper_log,
        ):
            ids = submit("flaky", key, JOBS, env)
            wait_for(lambda: len(stub.hits_for(key)) >= JOBS // 4, 60, "a quarter of the jobs", logs[0])
            server.kill()
            server.start()  # the same port, an empty dataset
            restarted = time.monotonic()
            seen_at_restart = len(stub.hits_for(key))
            rows = wait_terminal(ids, 150, [*logs, sweeper_log])
            recovered = time.monotonic() - restarted
            requeues = requeued(sweeper_log)
            assert all(p.poll() is None for p in nodes), "a worker node exited"
    assert_all_succeeded(rows)
    by_job = executions(stub, key, ids)
    twice = assert_never_concurrent(by_job)
    report(
        "redis restart",
        requests_before_restart=seen_at_restart,
        jobs_run_more_than_once=twice,
        requests=sum(map(len, by_job.values())),
        sweeper_requeues=requeues,
        all_done_s_after_restart=round(recovered, 1),
        reconnects=sum(count_lines(p, "Connected to redis://") for p in logs) - len(logs),
    )


@pytest.mark.timeout(240)
def test_postgres_unreachable_for_ten_seconds_mid_flight(tmp_path: Path, stub: Stub, key: str) -> None:
    stub.plan(key, *[Reply(delay=0.2)] * (2 * JOBS))
    db = make_url(DATABASE_URL)
    target = (db.host or "127.0.0.1", db.port or 5432)
    late_key = "cut-" + uuid.uuid4().hex[:12]  # submitted while the database is away
    with TcpProxy(target) as proxy, redis_server(tmp_path) as server:
        via_proxy = db.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = stack_env(server.url, via_proxy, SERVICES_FILE=FAULT_SERVICES, **FAULT_SETTINGS)
        names = ["pg1", "pg2"]
        logs = [tmp_path / f"worker-{name}.log" for name in names]
        with (
            worker_nodes(names, env, tmp_path, ["-P", "prefork", "-c", "2"]),
            sweeper(env, tmp_path) as sweeper_log,
        ):
            ids = submit("flaky", key, JOBS, env)
            wait_for(lambda: len(stub.hits_for(key)) >= JOBS // 4, 60, "a quarter of the jobs", logs[0])
            dropped = proxy.open_connections
            proxy.cut()
            cut_at = time.monotonic()
            seen_at_cut = len(stub.hits_for(key))
            refused = cli("call", "flaky", "echo", f"key={late_key}", "--idempotency-key", late_key, env=env)
            submit_s = time.monotonic() - cut_at
            time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))
            proxy.restore()
            restored = time.monotonic()
            seen_during_cut = len(stub.hits_for(key)) - seen_at_cut
            rows = wait_terminal(ids, 150, [*logs, sweeper_log])
            recovered = time.monotonic() - restored
            requeues = requeued(sweeper_log)
    # The submission during the cut: refused in one line naming the ledger, nothing left behind.
    assert refused.returncode != 0
    assert "ledger database" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    with get_engine().connect() as conn:
        rows_left = conn.execute(
            select(func.count()).select_from(ledger.jobs).where(ledger.jobs.c.idempotency_key == late_key)
        ).scalar_one()
    assert rows_left == 0
    assert not stub.hits_for(late_key)

    assert_all_succeeded(rows)
    by_job = executions(stub, key, ids)
    twice = assert_never_concurrent(by_job)
    report(
        "postgres cut",
        connections_dropped=dropped,
        refused_submit=refused.stderr.strip(),
        refused_submit_s=round(submit_s, 1),
        requests_before_cut=seen_at_cut,
        requests_during_cut=seen_during_cut,
        jobs_run_more_than_once=twice,
        requests=sum(map(len, by_job.values())),
        sweeper_requeues=requeues,
        all_done_s_after_restore=round(recovered, 1),
        ledger_retries_logged=sum(count_lines(p, "ledger unreachable") for p in logs),
    )


RESULT = """
from tasks import call_service
print(call_service.AsyncResult({job_id!r}).get(timeout=30)["status"])
"""


@pytest.mark.timeout(180)
def test_an_outcome_got_while_postgres_is_away_past_the_time_limit_is_recorded_once_it_is_back(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    # The upstream answers after 1 s; the ledger goes away meanwhile and stays away past the
    # task's soft time limit (3 s), which cuts the retrying write. The outcome must not be lost
    # (the sweeper would call the upstream again): it is kept aside and recorded later.
    stub.plan(key, Reply(delay=1.0))
    db = make_url(DATABASE_URL)
    target = (db.host or "127.0.0.1", db.port or 5432)
    short = {**FAULT_SETTINGS, "TASK_SOFT_TIME_LIMIT": 3, "TASK_TIME_LIMIT": 6, "LEDGER_RETRY_FOR": 300}
    with TcpProxy(target) as proxy, redis_server(tmp_path) as server:
        via_proxy = db.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = stack_env(server.url, via_proxy, SERVICES_FILE=FAULT_SERVICES, **short)
        log = tmp_path / "worker-spool.log"
        with worker_nodes(["spool"], env, tmp_path, ["-P", "prefork", "-c", "1"]), sweeper(env, tmp_path):
            [job_id] = submit("flaky", key, 1, env)
            wait_for(lambda: stub.hits_for(key), 20, "the call to reach the upstream", log)
            proxy.cut()
            cut_at = time.monotonic()
            spool = redis.Redis(port=server.port, socket_timeout=2)
            wait_for(lambda: spool.hexists("integrations:spool", job_id), 20, "the outcome kept aside", log)
            # The agent has its result although the ledger is still away.
            result = python(RESULT.format(job_id=job_id), env, timeout=60)
            assert result.stdout.strip() == "succeeded", result.stderr[-2000:]
            time.sleep(max(0.0, 8 - (time.monotonic() - cut_at)))  # away for longer than the hard limit
            proxy.restore()
            rows = wait_terminal([job_id], 60, [log])
            wait_for(lambda: not spool.hexists("integrations:spool", job_id), 20, "the spool to empty", log)
            spool.close()
            time.sleep(3)  # the sweeper runs every second: it must not run the job again
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None and rows[job_id]["status"] == "succeeded"
    assert job["attempts"] == 1 and [a["outcome"] for a in job["attempts_log"]] == ["succeeded"]
    assert len(stub.hits_for(key)) == 1
    assert "kept aside" in log.read_text()


STATE = """
from tasks import call_service
print(call_service.AsyncResult({job_id!r}).state)
"""


@pytest.mark.timeout(180)
def test_a_job_whose_claim_cannot_reach_the_ledger_is_not_reported_failed(
    tmp_path: Path, stub: Stub, key: str
) -> None:
    # Submitted while the ledger is up; the worker starts while it is away and past the soft
    # time limit. Nothing was claimed or called: the agent must not be told "failed".
    db = make_url(DATABASE_URL)
    target = (db.host or "127.0.0.1", db.port or 5432)
    short = {**FAULT_SETTINGS, "TASK_SOFT_TIME_LIMIT": 3, "TASK_TIME_LIMIT": 6, "DEFER_COUNTDOWN_MAX": 2}
    with TcpProxy(target) as proxy, redis_server(tmp_path) as server:
        via_proxy = db.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = stack_env(server.url, via_proxy, SERVICES_FILE=FAULT_SERVICES, **short)
        [job_id] = submit("flaky", key, 1, env)
        proxy.cut()
        log = tmp_path / "worker-claim.log"
        with worker_nodes(["claim"], env, tmp_path, ["-P", "prefork", "-c", "1"]):
            wait_for(lambda: "deferred before its claim" in log.read_text(), 40, "a claim deferred", log)
            assert python(STATE.format(job_id=job_id), env).stdout.strip() == "PENDING"
            proxy.restore()
            rows = wait_terminal([job_id], 60, [log])
    assert rows[job_id]["status"] == "succeeded" and rows[job_id]["attempts"] == 1
    assert len(stub.hits_for(key)) == 1
