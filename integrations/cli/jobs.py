"""The ``integrations`` commands that read the jobs in the ledger: jobs, job, stats, health, prune."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from integrations.cli import _fmt, _table, duration, positive
from integrations.errors import IntegrationError
from integrations.ledger.models import JobStatus


def _since(args: argparse.Namespace) -> dt.datetime | None:
    return dt.datetime.now(dt.UTC) - args.since if args.since else None


def cmd_jobs(args: argparse.Namespace) -> int:
    from integrations.ledger import reads

    rows = reads.list_jobs(status=args.status, service=args.service, limit=args.limit)
    cols = ["id", "service", "operation", "status", "attempts", "status_code", "latency_ms", "created_at"]
    if args.status == "failed":
        cols.append("error")
    print(_table(rows, cols))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from integrations import breaker
    from integrations.ledger import jobs
    from integrations.services import get_services

    names = [s.name for s in get_services().values() if s.health is not None and s.health.enabled]
    if not names:
        print("no service has a health check (add 'health:' to a service in the services file)")
        return 0
    rows = jobs.health_of(names, since=_since(args))
    for row in rows:
        row["breaker"] = breaker.state(row["service"])
        row["passed"] = None if row["passed"] is None else f"{row['passed']:.0%}"
    cols = ["service", "status", "status_code", "latency_ms", "breaker", "checked_at", "last_success_at"]
    print(_table(rows, [*cols, "checks", "passed"]))
    for row in rows:
        if row["last_error"]:
            print(f"{row['service']}: last error at {_fmt(row['last_error_at'])}: {row['last_error']}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from integrations.ledger import reads

    job = reads.get_job(args.id, with_attempts=True)
    if job is None:
        raise IntegrationError(f"no job with id {args.id}")
    attempts = job.pop("attempts_log")
    for key, value in job.items():
        shown = json.dumps(value) if isinstance(value, dict) else _fmt(value)
        print(f"{key:>16}: {shown}")
    print("\nattempts:")
    cols = ["number", "outcome", "status_code", "latency_ms", "error", "started_at"]
    print(_table(attempts, cols))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from integrations.ledger import jobs

    rows = jobs.stats(since=_since(args))
    for r in rows:
        rate = r["success_rate"]
        r["success"] = "-" if rate is None else f"{rate:.0%}"
    cols = ["service", "operation", "count", "succeeded", "failed", "success", "p50_ms", "p95_ms"]
    print(_table(rows, [*cols, "input_tokens", "output_tokens"]))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from integrations.config.durations import format_duration
    from integrations.ledger import retention

    done = retention.prune(args.older_than, batch=args.batch)
    what = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in done.counts.items())
    print(
        f"deleted {what} older than {format_duration(args.older_than)} "
        f"({done.batches} batches, the longest {done.longest_batch:.2f} s)"
    )
    return 0


def add_commands(sub: Any) -> None:
    """The commands that read the jobs in the ledger."""
    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument("--status", choices=[s.value for s in JobStatus])
    j.add_argument("--service")
    j.add_argument("--limit", type=positive(int), default=20)
    j.set_defaults(func=cmd_jobs)

    one = sub.add_parser("job", help="one job with its attempts")
    one.add_argument("id")
    one.set_defaults(func=cmd_job)

    st = sub.add_parser("stats", help="per service and operation: count, success rate, p50/p95, tokens")
    st.add_argument("--since", type=duration, help="only jobs created in this last span (30m, 1h, 7d)")
    st.set_defaults(func=cmd_stats)
    he = sub.add_parser(
        "health", help="per service: last health check, latency, breaker, last error and success, pass rate"
    )
    he.add_argument(
        "--since", type=duration, default=duration("24h"), help="count the checks of this last span (24h)"
    )
    he.set_defaults(func=cmd_health)
    pr = sub.add_parser(
        "prune", help="delete finished jobs, events, deliveries (and what hangs on them) older than a span"
    )
    pr.add_argument("--older-than", type=duration, required=True, help="e.g. 30d")
    pr.add_argument("--batch", type=positive(int), default=1000, help="rows per transaction (default 1000)")
    pr.set_defaults(func=cmd_prune)
