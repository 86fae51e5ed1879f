"""CPU time per job on the job path: what a worker node and a submitter spend, not how fast.

`make bench` measures throughput, which on a machine whose two cores are shared swings several
times over from one run to the next with what the other processes do. The CPU time the worker's
processes spend on a job moves much less: this measures it, for (a) a no-op task, (c) call_service
through the limiter and the breaker and (u) call_service without them, over loopback HTTP,
``--rounds`` interleaved rounds of ``-n`` jobs, medians.

Worker CPU: user + system time of every process of the worker's group (main and pool), from
/proc, before and after the drain. Submit CPU: this process's time in ``delay()``.
``--otlp-sink`` turns tracing on everywhere (``OTEL_EXPORTER_OTLP_ENDPOINT`` at a local sink
that answers 200), to price the traces. Uses bench.py's set-up (BENCH_REDIS_URL,
BENCH_DATABASE_URL). ``python tests/bench_cpu.py [-n 1000] [--rounds 5] [--otlp-sink]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """Seconds of CPU used so far by the live processes of group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command's closing parenthesis: state, ppid, pgrp, ..., utime (12th), stime.
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--otlp-sink", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    port = bench.free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        BROKER_URL=bench.REDIS, RESULT_BACKEND=bench.REDIS, DATABASE_URL=bench.PG,
        SERVICES_FILE=str(HERE / "bench_services.yaml"), STUB_URL=url, STUB_TLS_URL=url,
        STUB_CA=str(HERE / "bench_services.yaml"), STUB_TOKEN="bench-token",
        BENCH_WEBHOOK_SECRET="bench-webhook-secret",
    )  # fmt: skip
    if args.otlp_sink:
        sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
        threading.Thread(target=sink.serve_forever, daemon=True).start()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.server_address[1]}"
    upstream = bench.start_upstream(port)
    bench.prepare_database()
    import redis

    r = redis.Redis.from_url(bench.REDIS)
    r.flushdb()
    from tasks import app, call_service

    env = {**os.environ, "PYTHONPATH": str(HERE)}
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "tasks", "worker", "-I", "bench_tasks", "-n", "cpu@%h"),
        *(f"--concurrency={bench.CONCURRENCY}", "--pool=prefork", "--loglevel=WARNING"),
        *("--without-gossip", "--without-mingle"),
    ]
    log = open(os.devnull, "wb")  # noqa: SIM115 (the worker's, for its life)
    worker = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=log, stderr=log)
    noop = app.tasks["bench.noop"]
    kinds: dict[str, Callable[[int], object]] = {
        "a_noop": lambda k: [noop.delay() for _ in range(k)],
        "c_call_service_http": lambda k: [call_service.delay("stub", "echo", {"key": "b"}) for _ in range(k)],
        "u_ungated_http": lambda k: [
            call_service.delay("stub_ungated", "echo", {"key": "b"}) for _ in range(k)
        ],
    }
    worker_ms: dict[str, list[float]] = {k: [] for k in kinds}
    submit_ms: dict[str, list[float]] = {k: [] for k in kinds}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=1):
            if time.monotonic() > deadline:
                raise SystemExit("bench_cpu: the worker did not start")
        for publish in kinds.values():
            bench.drain(app, r, 100, publish)
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for kind, publish in kinds.items():

                def timed(k: int, publish: Callable[[int], object] = publish, kind: str = kind) -> None:
                    t0 = time.process_time()
                    publish(k)
                    submit_ms[kind].append((time.process_time() - t0) / k * 1000)

                cpu0 = group_cpu(worker.pid)
                rate, _ = bench.drain(app, r, args.n, timed)
                worker_ms[kind].append((group_cpu(worker.pid) - cpu0) / args.n * 1000)
                rates[kind].append(rate)
            loads.append(os.getloadavg()[0])
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
        upstream.terminate()
        upstream.wait(timeout=10)
    out = {
        "jobs_per_run": args.n,
        "rounds": args.rounds,
        "tracing": args.otlp_sink,
        "load_average_1m": [round(x, 2) for x in loads],
        "worker_cpu_ms_per_job": {k: round(statistics.median(v), 3) for k, v in worker_ms.items()},
        "worker_cpu_ms_runs": {k: [round(x, 3) for x in v] for k, v in worker_ms.items()},
        "submit_cpu_ms_per_job": {k: round(statistics.median(v), 3) for k, v in submit_ms.items()},
        "jobs_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
