"""`make bench`: call_service's throughput against Celery's ceiling and a naive baseline.

All run in one go on the same Redis, the same Postgres and the same worker (prefork, same
concurrency, prefetch, acks_late, events, result backend), against the same loopback upstream:

  (a) a no-op task                       -> Celery's ceiling on this machine
  (b) requests.get + one ORM insert      -> the naive baseline
  (c) call_service end to end            -> ours, ledger rows written, with the global rate
                                            limiter (a limit too high to bind) and the breaker
  (u) call_service without limiter/breaker -> what the gate costs is 1 - c/u

(b) and (c) run against the upstream over plain HTTP and over HTTPS (a self-signed
certificate made for the run), since real upstreams speak TLS. Then 400 jobs go to a
service limited to 20/s (burst 5): the rate the upstream saw is printed beside it.

Last, the webhook receiver: BENCH_RECEIVER_N (4,000) signed GitHub deliveries posted by 20
client threads (in this process) to three uvicorn servers in turn (BENCH_RECEIVER_WORKERS
processes each, default 1): a bare app answering 202 (the HTTP stack's ceiling), a naive
receiver (HMAC check, ORM insert, delay()) and ours (verify, dedupe insert, queue, each
delivery stored before its answer: checked after each run), BENCH_RECEIVER_ROUNDS (7) times,
interleaved; the median counts, the spread and the machine's load average are kept beside it.
`bench.py --receivers-only` measures the receivers alone.

Throughput is the worker draining a pre-filled queue: consumption is paused, N messages are
published, consumption resumes and the clock runs until the Nth result is stored. Each kind
runs BENCH_ROUNDS times, interleaved, and the median counts. The submit rate is delay() from
this one process while the queue fills. Latency is submit to succeeded (ledger timestamps) at
about 20 jobs/s.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PG = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
#: The receivers are quick to measure and noisy on a shared machine: more rounds.
RECEIVER_ROUNDS = int(os.environ.get("BENCH_RECEIVER_ROUNDS", "7"))
#: Processes of each receiver (uvicorn --workers), and deliveries posted per run.
RECEIVER_WORKERS = int(os.environ.get("BENCH_RECEIVER_WORKERS", "1"))
RECEIVER_N = int(os.environ.get("BENCH_RECEIVER_N", "4000"))
#: The 1-minute load average after each receiver run.
LOADS: list[float] = []
QUEUE = "integrations"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def start_upstream(port: int, *tls: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(HERE / "fast_stub.py"), str(port), *map(str, tls)],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def prepare_database() -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    # The database BENCH_DATABASE_URL names, so two benches on one server keep apart.
    name = make_url(PG).database or "bench"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    from integrations.ledger.migrate import upgrade

    upgrade(PG)
    import bench_tasks

    bench_tasks.Base.metadata.create_all(bench_tasks.engine)


def results_stored(r: Any) -> int:
    return sum(1 for _ in r.scan_iter("celery-task-meta-*", count=5000))


def drain(app: Any, r: Any, n: int, publish: Callable[[int], object]) -> tuple[float, float]:
    """Pause consumption, publish ``n`` messages, resume; return (jobs/s drained, submits/s)."""
    for keys in iter(lambda: list(r.scan_iter("celery-task-meta-*", count=5000)), []):
        r.delete(*keys)
    # limit=1: return at the one worker's reply, not after the whole timeout.
    app.control.cancel_consumer(QUEUE, reply=True, timeout=5, limit=1)
    t0 = time.perf_counter()
    publish(n)
    submit_rate = n / (time.perf_counter() - t0)
    start = time.perf_counter()
    app.control.add_consumer(QUEUE, reply=True, timeout=5, limit=1)
    deadline = time.monotonic() + 600
    while results_stored(r) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: only {results_stored(r)} of {n} results after 600 s")
        time.sleep(0.1)
    return n / (time.perf_counter() - start), submit_rate


def latency(n: int, per_second: float) -> dict[str, float]:
    from integrations.ledger import reads
    from tasks import call_service

    ids = []
    t0 = time.perf_counter()
    for i in range(n):
        ids.append(call_service.delay("stub", "echo", {"key": "lat"}).id)
        pause = t0 + (i + 1) / per_second - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    deadline = time.monotonic() + 60
    lat = []
    for job_id in ids:
        while not ((job := reads.get_job(job_id)) and job["finished_at"]):
            if time.monotonic() > deadline:
                raise SystemExit("bench: latency jobs did not finish in 60 s")
            time.sleep(0.01)
        lat.append((job["finished_at"] - job["created_at"]).total_seconds() * 1000)
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "rate_per_s": per_second, "jobs": n}


def limiter_accuracy(n: int) -> dict[str, Any]:
    """Submit ``n`` jobs at once to the service limited to 20/s; measure the rate of their
    calls from the ledger's start times (the claim comes right after the limiter's slot)."""
    from integrations.ledger import reads
    from integrations.services import get_services
    from tasks import call_service

    limit = get_services()["stub_limited"].global_limit
    assert limit is not None
    ids = [call_service.delay("stub_limited", "echo", {"key": "lim"}).id for _ in range(n)]
    deadline = time.monotonic() + 120
    starts = []
    for job_id in ids:
        while not ((job := reads.get_job(job_id)) and job["finished_at"]):
            if time.monotonic() > deadline:
                raise SystemExit("bench: limited jobs did not finish in 120 s")
            time.sleep(0.01)
        starts.append(job["started_at"].timestamp())
    starts.sort()
    # After the burst, calls go one interval apart: (n - burst) intervals from the burst's end.
    span = starts[-1] - starts[limit.burst - 1]
    busiest = max(bisect.bisect_left(starts, t + 1.0) - i for i, t in enumerate(starts))
    return {
        "configured_per_s": limit.per_second,
        "burst": limit.burst,
        "jobs": n,
        "observed_per_s": round((n - limit.burst) / span, 2),
        "max_in_1s": busiest,
    }


def post_deliveries(url: str, n: int, clients: int, secret: str, run: str | None = None) -> float:
    """Post ``n`` signed GitHub deliveries (ids ``run-0`` ...) from ``clients`` threads; return
    requests/s."""
    import hashlib
    import hmac
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import requests

    run = run or uuid.uuid4().hex[:8]
    bodies = [json.dumps({"n": i, "ref": "refs/heads/main", "run": run}).encode() for i in range(n)]
    local = threading.local()

    def post(i: int) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        sig = "sha256=" + hmac.new(secret.encode(), bodies[i], hashlib.sha256).hexdigest()
        headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push", "X-GitHub-Delivery": f"{run}-{i}",
                   "Content-Type": "application/json"}  # fmt: skip
        return session.post(f"{url}/webhooks/github", data=bodies[i], headers=headers, timeout=30).status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = list(pool.map(post, range(n)))
    rate = n / (time.perf_counter() - t0)
    if codes.count(202) != n:
        raise SystemExit(f"bench: receiver at {url} answered {sorted(set(codes))}, not 202 to all")
    return rate


def receiver_rates(n: int, env: dict[str, str], log: Path) -> dict[str, list[float]]:
    """Requests/s of the bare, naive and our receiver, each served by uvicorn (RECEIVER_WORKERS
    processes each), RECEIVER_ROUNDS rounds, interleaved."""
    apps = {
        "bare": ["-m", "uvicorn", "bench_receivers:bare"],
        "naive": ["-m", "uvicorn", "bench_receivers:naive"],
        "ours": ["-m", "uvicorn", "--factory", "tasks.receiver:app_from_settings"],
    }
    rates: dict[str, list[float]] = {k: [] for k in apps}
    for i in range(RECEIVER_ROUNDS):
        for name, args in apps.items():
            port = free_port()
            cmd = [sys.executable, *args, "--port", str(port), "--log-level", "warning", "--no-access-log"]
            cmd += ["--workers", str(RECEIVER_WORKERS)]
            with log.open("ab") as out:
                proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=out, stderr=out)
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise SystemExit(f"bench: receiver {name} did not start; see {log}") from None
                        time.sleep(0.1)
                post_deliveries(f"http://127.0.0.1:{port}", 100, 20, env["BENCH_WEBHOOK_SECRET"])  # warm-up
                run = f"{name}{i}"
                rates[name].append(
                    post_deliveries(f"http://127.0.0.1:{port}", n, 20, env["BENCH_WEBHOOK_SECRET"], run)
                )
                if name == "ours" and (stored := events_stored(run)) != n:
                    raise SystemExit(f"bench: {n} deliveries accepted, {stored} stored")
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            LOADS.append(os.getloadavg()[0])  # the machine is shared: how busy it was meanwhile
            print(f"  round {i + 1}  receiver {name:<13} {rates[name][-1]:7.0f} requests/s  "
                  f"(load average {LOADS[-1]:.1f})", flush=True)  # fmt: skip
    return rates


def events_stored(run: str) -> int:
    """How many events of the run ``run`` the ledger holds."""
    from sqlalchemy import func, select

    from integrations.ledger.db import get_engine
    from integrations.ledger.models import Event

    with get_engine().connect() as conn:
        q = select(func.count()).select_from(Event).where(Event.delivery_id.like(f"{run}-%"))
        return int(conn.execute(q).scalar_one())


def receiver_summary(rates: dict[str, list[float]]) -> dict[str, Any]:
    """Median, spread (min and max) and every run of each receiver, and ours against the others."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "receiver_requests_per_s": {k: round(v, 1) for k, v in med.items()},
        "receiver_spread_per_s": {k: [round(min(v), 1), round(max(v), 1)] for k, v in rates.items()},
        "receiver_runs_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "receiver_ours_over_bare": round(med["ours"] / med["bare"], 3),
        "receiver_ours_over_naive": round(med["ours"] / med["naive"], 3),
        "receiver_rounds": RECEIVER_ROUNDS,
        "receiver_workers": RECEIVER_WORKERS,
        "receiver_load_average": [round(x, 1) for x in LOADS],
    }


def print_receivers(out: dict[str, Any]) -> None:
    rec, spread = out["receiver_requests_per_s"], out["receiver_spread_per_s"]
    shown = ", ".join(
        f"{k} {rec[k]:.0f} ({spread[k][0]:.0f}-{spread[k][1]:.0f})" for k in ("ours", "naive", "bare")
    )
    bare, naive = out["receiver_ours_over_bare"], out["receiver_ours_over_naive"]
    ratios = f"ours/bare = {bare:.2f}, ours/naive = {naive:.2f}"
    print(f"  webhook receiver, requests/s, median (min-max) of {out['receiver_rounds']}: {shown}; {ratios}")


def receivers_only(env: dict[str, str], tmp: Path, out_file: str) -> None:
    """`bench.py --receivers-only`: the three receivers, RECEIVER_ROUNDS interleaved rounds."""
    print(f"bench: receivers only, {RECEIVER_ROUNDS} rounds, {os.cpu_count()} CPUs", flush=True)
    out = receiver_summary(receiver_rates(RECEIVER_N, env, tmp / "receivers.log"))
    print()
    print_receivers(out)
    Path(out_file).write_text(json.dumps(out, indent=2) + "\n")
    print(f"figures written to {out_file}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("-n", type=int, default=int(os.environ.get("BENCH_N", "2000")))
    ap.add_argument("--receivers-only", action="store_true", help="only the webhook receivers")
    args = ap.parse_args()
    n = args.n

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    cert, key = make_certificate(tmp)
    http_port, https_port = free_port(), free_port()
    http_url, https_url = f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}"
    os.environ.update(
        BROKER_URL=REDIS, RESULT_BACKEND=REDIS, DATABASE_URL=PG,
        SERVICES_FILE=str(HERE / "bench_services.yaml"),
        STUB_URL=http_url, STUB_TLS_URL=https_url, STUB_CA=str(cert), STUB_TOKEN="bench-token",
        BENCH_WEBHOOK_SECRET="bench-webhook-secret",
    )  # fmt: skip
    sys.path.insert(0, str(HERE))
    upstreams = [start_upstream(http_port), start_upstream(https_port, cert, key)]
    prepare_database()
    import redis

    r = redis.Redis.from_url(REDIS)
    r.flushdb()

    from tasks import app, call_service

    env = {**os.environ, "PYTHONPATH": str(HERE)}
    if args.receivers_only:
        receivers_only(env, tmp, args.out)
        for u in upstreams:
            u.terminate()
            u.wait(timeout=10)
        return
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "tasks", "worker", "-I", "bench_tasks", "-n", "bench@%h"),
        *(f"--concurrency={CONCURRENCY}", "--pool=prefork", "--loglevel=WARNING"),
        *("--without-gossip", "--without-mingle"),
    ]
    worker_log = (tmp / "worker.log").open("wb")
    worker = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True, stdout=worker_log, stderr=worker_log
    )
    noop, naive = app.tasks["bench.noop"], app.tasks["bench.naive"]
    kinds: dict[str, Callable[[int], object]] = {
        "a_noop": lambda k: [noop.delay() for _ in range(k)],
        "b_naive_http": lambda k: [naive.delay(http_url + "/echo/n") for _ in range(k)],
        "c_call_service_http": lambda k: [call_service.delay("stub", "echo", {"key": "b"}) for _ in range(k)],
        "u_ungated_http": lambda k: [
            call_service.delay("stub_ungated", "echo", {"key": "b"}) for _ in range(k)
        ],
        "b_naive_https": lambda k: [naive.delay(https_url + "/echo/n", str(cert)) for _ in range(k)],
        "c_call_service_https": lambda k: [
            call_service.delay("stub_tls", "echo", {"key": "b"}) for _ in range(k)
        ],
    }
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    submits: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=1):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the worker did not start; see {tmp / 'worker.log'}")
        print(f"bench: {n} jobs a run, {ROUNDS} rounds, prefork concurrency {CONCURRENCY}, "
              f"{os.cpu_count()} CPUs, Redis + Postgres + upstream on loopback", flush=True)  # fmt: skip
        for publish in kinds.values():  # warm-up: pools, connections, prepared statements
            drain(app, r, 100, publish)
        for i in range(ROUNDS):
            for kind, publish in kinds.items():
                rate, submit = drain(app, r, n, publish)
                rates[kind].append(rate)
                submits[kind].append(submit)
                print(f"  round {i + 1}  {kind:<22} {rate:7.0f} jobs/s", flush=True)
        lat = latency(200, 20.0)
        limiter = limiter_accuracy(400)
        receivers = receiver_rates(RECEIVER_N, env, tmp / "receivers.log")
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
        for u in upstreams:
            u.terminate()
            u.wait(timeout=10)

    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {
        "jobs_per_run": n,
        "rounds": ROUNDS,
        "concurrency": CONCURRENCY,
        "cpus": os.cpu_count(),
        "throughput_per_s": {k: round(v, 1) for k, v in med.items()},
        "runs_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "c_over_a": round(med["c_call_service_http"] / med["a_noop"], 3),
        "c_over_b_http": round(med["c_call_service_http"] / med["b_naive_http"], 3),
        "c_over_b_https": round(med["c_call_service_https"] / med["b_naive_https"], 3),
        "gate_overhead": round(1 - med["c_call_service_http"] / med["u_ungated_http"], 3),
        "submit_per_s": round(statistics.median(submits["c_call_service_http"]), 1),
        "latency_at_20_per_s": lat,
        "limiter": limiter,
        **receiver_summary(receivers),
    }
    print()
    for k, v in med.items():
        print(f"  {k:<22} {v:7.0f} jobs/s (median)")
    print(f"  c/a = {out['c_over_a']:.2f}    c/b = {out['c_over_b_http']:.2f} (HTTP)    "
          f"c/b = {out['c_over_b_https']:.2f} (HTTPS)")  # fmt: skip
    print(f"  limiter + breaker overhead: {out['gate_overhead']:.1%} of call_service throughput")
    print(f"  limiter: configured {limiter['configured_per_s']:.0f}/s (burst {limiter['burst']}), "
          f"observed {limiter['observed_per_s']:.1f}/s, "
          f"busiest second {limiter['max_in_1s']} calls")  # fmt: skip
    print(f"  delay() from one process: {out['submit_per_s']:.0f}/s")
    print(f"  submit-to-succeeded at 20 jobs/s: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")
    print_receivers(out)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
