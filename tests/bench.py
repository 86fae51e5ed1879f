"""`make bench`: call_service's throughput against Celery's ceiling and a naive baseline.

All three run in one go on the same Redis, the same Postgres and the same worker (prefork,
same concurrency, prefetch, acks_late, result backend), against the same loopback stub:

  (a) a no-op task                       -> Celery's ceiling on this machine
  (b) requests.get + one ORM insert      -> the naive baseline
  (c) call_service end to end            -> ours, ledger rows written

Throughput is the worker draining a pre-filled queue: consumption is paused, N messages are
published, consumption resumes and the clock runs until the Nth result is stored. The submit
rate is delay() from this one process while the queue fills. Latency is submit to succeeded
(ledger timestamps) at about 20 jobs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PG = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
POOL = os.environ.get("BENCH_POOL", "prefork")
QUEUE = "integrations"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STUB_PORT = free_port()
STUB_URL = f"http://127.0.0.1:{STUB_PORT}"
os.environ.update(
    BROKER_URL=REDIS,
    RESULT_BACKEND=REDIS,
    DATABASE_URL=PG,
    SERVICES_FILE=str(HERE / "services.yaml"),
    STUB_URL=STUB_URL,
    STUB_TOKEN="bench-token",
)


def prepare_database() -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS bench WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE bench"))
    admin.dispose()
    from integrations.ledger.migrate import upgrade

    upgrade(PG)
    import bench_tasks

    bench_tasks.Base.metadata.create_all(bench_tasks.engine)


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS)


def results_stored(r: Any) -> int:
    return sum(1 for _ in r.scan_iter("celery-task-meta-*", count=5000))


def wait_results(r: Any, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if results_stored(r) >= n:
            return time.perf_counter()
        time.sleep(0.1)
    raise SystemExit(f"bench: only {results_stored(r)} of {n} results after {timeout}s")


def drain(app: Any, r: Any, label: str, n: int, publish: Any) -> dict[str, float]:
    """Pause consumption, publish ``n`` messages, resume, time until ``n`` results are stored."""
    r.delete(*r.keys("celery-task-meta-*") or ["none"])
    app.control.cancel_consumer(QUEUE, reply=True, timeout=5)
    t0 = time.perf_counter()
    publish(n)
    submit_s = time.perf_counter() - t0
    start = time.perf_counter()
    app.control.add_consumer(QUEUE, reply=True, timeout=5)
    end = wait_results(r, n, timeout=600)
    rate = n / (end - start)
    print(f"  {label:<34} {rate:8.0f} jobs/s   (submitted at {n / submit_s:6.0f}/s)", flush=True)
    return {"throughput": rate, "submit_rate": n / submit_s}


def latency(n: int, per_second: float) -> dict[str, float]:
    from integrations.ledger import jobs as ledger
    from tasks import call_service

    ids = []
    t0 = time.perf_counter()
    for i in range(n):
        ids.append(call_service.delay("stub", "echo", {"key": "lat"}).id)
        sleep = t0 + (i + 1) / per_second - time.perf_counter()
        if sleep > 0:
            time.sleep(sleep)
    deadline = time.monotonic() + 60
    lat = []
    for job_id in ids:
        while True:
            job = ledger.get_job(job_id)
            if job and job["finished_at"]:
                break
            if time.monotonic() > deadline:
                raise SystemExit("bench: latency jobs did not finish in 60 s")
            time.sleep(0.01)
        lat.append((job["finished_at"] - job["created_at"]).total_seconds() * 1000)
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive")
    print(f"  submit-to-succeeded at {per_second:.0f}/s: p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms", flush=True)
    return {"p50_ms": q[49], "p99_ms": q[98], "rate": per_second, "jobs": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("-n", type=int, default=int(os.environ.get("BENCH_N", "3000")))
    args = ap.parse_args()

    stub = subprocess.Popen(
        [sys.executable, str(HERE / "fast_stub.py"), str(STUB_PORT)], stdout=subprocess.PIPE
    )
    assert stub.stdout is not None and stub.stdout.readline().strip() == b"ready"
    prepare_database()
    r = redis_client()
    r.flushdb()

    from tasks import app, call_service

    env = {**os.environ, "PYTHONPATH": str(HERE)}
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        "worker",
        "-I",
        "bench_tasks",
        "-c",
        str(CONCURRENCY),
        f"--pool={POOL}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "-n",
        "bench@%h",
    ]
    worker = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=1):
            if time.monotonic() > deadline:
                raise SystemExit("bench: worker did not start")
        n = args.n
        url = STUB_URL + "/echo/naive"
        print(f"bench: {n} jobs per run, prefork concurrency {CONCURRENCY}, Redis + Postgres on loopback")
        # A warm-up of each kind, so connections and pools exist before the clock runs.
        drain(
            app,
            r,
            "warm-up",
            200,
            lambda k: [call_service.delay("stub", "echo", {"key": "w"}) for _ in range(k)],
        )
        noop = drain(
            app, r, "(a) no-op task", n, lambda k: [app.tasks["bench.noop"].delay() for _ in range(k)]
        )
        naive = drain(
            app,
            r,
            "(b) naive requests + ORM insert",
            n,
            lambda k: [app.tasks["bench.naive"].delay(url) for _ in range(k)],
        )
        ours = drain(
            app,
            r,
            "(c) call_service (ledger)",
            n,
            lambda k: [call_service.delay("stub", "echo", {"key": "b"}) for _ in range(k)],
        )
        lat = latency(200, 20.0)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
        stub.terminate()
        stub.wait(timeout=10)

    out = {
        "jobs_per_run": args.n,
        "concurrency": CONCURRENCY,
        "cpus": os.cpu_count(),
        "a_noop_per_s": round(noop["throughput"], 1),
        "b_naive_per_s": round(naive["throughput"], 1),
        "c_call_service_per_s": round(ours["throughput"], 1),
        "c_over_a": round(ours["throughput"] / noop["throughput"], 3),
        "c_over_b": round(ours["throughput"] / naive["throughput"], 3),
        "submit_per_s": round(ours["submit_rate"], 1),
        "latency": {k: round(v, 2) for k, v in lat.items()},
    }
    print(
        f"c/a = {out['c_over_a']:.2f}   c/b = {out['c_over_b']:.2f}   "
        f"delay() {out['submit_per_s']:.0f}/s   p50 {lat['p50_ms']:.1f} ms   p99 {lat['p99_ms']:.1f} ms"
    )
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
