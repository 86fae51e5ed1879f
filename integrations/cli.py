"""The ``integrations`` command: read the ledger, check the services file, manage endpoints.

The commands that submit jobs or serve the receiver need the Celery app and live in
``tasks.cli``, which adds them to these. Every error is one line on stderr and a non-zero exit;
no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from integrations.errors import IntegrationError
from integrations.ledger.models import DeliveryStatus, JobStatus
from integrations.redact import redact


def parse_value(raw: str, schema: dict[str, Any] | None) -> Any:
    """A ``key=value`` value as the parameter's schema declares it: text for a string (``id=1``
    stays ``"1"``), else JSON when it parses as JSON (numbers, true, lists), else text."""
    types = (schema or {}).get("type")
    if types == "string":
        return raw
    try:
        return json.loads(raw)
    except RecursionError:
        raise IntegrationError("a key=value value is nested too deeply") from None
    except ValueError:
        return raw


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number above zero."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("must be a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be above zero")
        return value

    return parse


def duration(text: str) -> dt.timedelta:
    """An argparse type: a span of time such as ``30m``, ``1h``, ``7d``."""
    from integrations.config.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _since(args: argparse.Namespace) -> dt.datetime | None:
    return dt.datetime.now(dt.UTC) - args.since if args.since else None


def parse_params(pairs: Sequence[str], schema: dict[str, Any]) -> dict[str, Any]:
    """``["key=value", ...]`` as params of an operation whose params schema is ``schema``."""
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise IntegrationError("expected key=value for each parameter")
        out[key] = parse_value(value, props.get(key))
    return out


#: Control characters (a terminal's escape sequences among them) shown as escapes: an
#: upstream's error text or a sender's event type must not drive the operator's terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).translate(_CONTROL)


def _shown_url(url: str) -> str:
    """An endpoint's URL as listed: its origin only, since a path or query may be the secret
    (Slack's and Discord's webhook URLs are)."""
    parts = urlsplit(url)
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{parts.netloc}{rest}"


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


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


def cmd_services(args: argparse.Namespace) -> int:
    from integrations.config import get_mailboxes, get_settings, get_webhooks
    from integrations.services import get_services

    services = get_services()
    webhooks, mailboxes = get_webhooks(), get_mailboxes()
    print(f"{get_settings().services_file}: {len(services)} services, valid")
    for svc in services.values():
        limit = f", rate limit {svc.rate_limit}" if svc.rate_limit else ""
        print(redact(f"{svc.name} ({svc.describe()}{limit})"))
        for name, op in svc.catalog().items():
            line = svc.describe_operation(name, op)
            print(f"  {name}: {line}" if line else f"  {name}")
    from integrations.tools.agents import get_agents

    agents = get_agents()
    if agents:
        print(f"agents ({len(agents)}), with the tools each may use:")
        for agent in agents.values():
            sets = [f"{svc} ({'all' if ops == '*' else ', '.join(ops)})" for svc, ops in agent.tools.items()]
            print(f"  {agent.name}: {'; '.join(sets) or 'none'}")
    if webhooks:
        print(f"webhook sources ({len(webhooks)}), at POST /webhooks/<name>:")
        for src in webhooks.values():
            print(f"  {src.name} ({src.type})")
    if mailboxes:
        print(f"mailboxes ({len(mailboxes)}):")
        for box in mailboxes.values():
            state = "" if box.enabled else ", disabled"
            print(f"  {box.name} ({box.host}:{box.port}, {box.folder}, every {box.interval:g}s{state})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from integrations.ledger.migrate import upgrade, wait_for_database

    wait_for_database()
    upgrade()
    print("ledger schema is up to date")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from integrations.ledger import events

    if args.id:
        print(_table(events.handlings_of(args.id), ["handler", "status", "attempts", "error", "finished_at"]))
        return 0
    print(
        _table(
            events.list_events(args.source, args.limit),
            ["id", "source", "event_type", "delivery_id", "received_at"],
        )
    )
    return 0


def cmd_mailboxes(args: argparse.Namespace) -> int:
    from integrations.config import get_mailboxes
    from integrations.ledger.mailboxes import all_cursors

    cursors = all_cursors()
    rows = [
        {
            "mailbox": box.name,
            "host": box.host,
            "folder": box.folder,
            "interval": box.interval,
            "enabled": box.enabled,
            "uidvalidity": cursors.get(box.name, {}).get("uidvalidity"),
            "last_uid": cursors.get(box.name, {}).get("last_uid"),
            "polled_at": cursors.get(box.name, {}).get("updated_at"),
        }
        for box in get_mailboxes().values()
    ]
    if not rows:
        print("no mailboxes (add a mailboxes: section to the services file)")
        return 0
    print(
        _table(
            rows, ["mailbox", "host", "folder", "interval", "enabled", "uidvalidity", "last_uid", "polled_at"]
        )
    )
    return 0


def cmd_endpoints(args: argparse.Namespace) -> int:
    from integrations.ledger import deliveries
    from integrations.webhooks import outgoing

    if args.action == "add":
        if not args.url:
            raise IntegrationError("endpoints add needs a URL")
        endpoint_id, secret = outgoing.add_endpoint(
            args.url, args.events.split(","), args.secret, args.description
        )
        print(endpoint_id)
        if not args.secret:
            # Shown once, for the receiver to verify signatures with; no command shows it again.
            print(f"secret: {secret}")
        return 0
    if args.action == "list":
        cols = ["id", "url", "event_types", "enabled", "disabled_reason", "last_success_at", "created_at"]
        rows = [{**e, "url": _shown_url(e["url"])} for e in deliveries.list_endpoints()]
        print(_table(rows, cols))
        return 0
    if not args.url:
        raise IntegrationError(f"endpoints {args.action} needs an endpoint id")
    enable = args.action == "enable"
    if not deliveries.set_enabled(args.url, enable, None if enable else "disabled by an operator"):
        raise IntegrationError(f"no endpoint with id {args.url}")
    print(f"{args.url} {'enabled' if enable else 'disabled'}")
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    from integrations.ledger import deliveries

    rows = deliveries.list_deliveries(args.endpoint, args.status, args.limit)
    cols = ["id", "endpoint_id", "event_type", "status", "attempts", "last_status_code", "next_attempt_at"]
    print(_table(rows, [*cols, "created_at"]))
    return 0


def cmd_delivery(args: argparse.Namespace) -> int:
    from integrations.ledger import deliveries

    d = deliveries.get_delivery(args.id)
    if d is None:
        raise IntegrationError(f"no delivery with id {args.id}")
    for key in ("id", "endpoint_id", "event_type", "status", "attempts", "next_attempt_at", "last_error"):
        print(f"{key:>16}: {_fmt(d[key])}")
    print("\nattempts:")
    cols = ["number", "ok", "status_code", "duration_ms", "error", "response_excerpt", "at"]
    print(_table(deliveries.attempts_of(args.id), cols))
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    from integrations.tools import definitions

    tools = definitions(args.format, services=args.service or None, agent=args.agent, strict=args.strict)
    print(json.dumps(tools, indent=2))
    return 0


def cmd_import_openapi(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from integrations.tools import openapi, openapi_write

    if args.out and args.merge:
        raise IntegrationError("give --out FILE or --merge FILE, not both")
    t0 = time.perf_counter()
    imp = openapi.import_openapi(
        Path(args.spec),
        args.service,
        base_url=args.base_url,
        tags=tuple(args.tag or ()),
        operations=tuple(args.operation or ()),
        allow_private_network=args.allow_private_network,
    )
    if args.merge:
        openapi_write.merge(imp, Path(args.merge))
    elif args.out:
        Path(args.out).write_text(openapi_write.render(imp))
    else:
        print(openapi_write.render(imp), end="")
    took = time.perf_counter() - t0
    print(
        f"{args.service}: {len(imp.service['operations'])} operations imported, {len(imp.skipped)} not "
        f"expressible (listed in the file), {imp.excluded} not chosen, in {took:.2f}s",
        file=sys.stderr,
    )
    return 0


def cmd_mcp_token(args: argparse.Namespace) -> int:
    import os
    import secrets
    from pathlib import Path

    from integrations.config import get_settings
    from integrations.tools.mcp_server import load_tokens, token_hash

    path = Path(args.file) if args.file else get_settings().mcp_tokens_file
    if path is None:
        raise IntegrationError("give --file or set MCP_TOKENS_FILE")
    token = "mcp_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{token_hash(token)} {args.agent}\n")
    load_tokens(path)  # the file still reads
    # Shown once: only its hash is kept.
    print(token)
    return 0


def add_commands(sub: Any) -> None:
    """The commands that read and manage the ledger and the services file (no Celery app)."""
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
    sub.add_parser(
        "services", help="validate the services file and list services, webhook sources and mailboxes"
    ).set_defaults(func=cmd_services)
    sub.add_parser(
        "migrate", help="apply the ledger's migrations (waiting up to MIGRATE_WAIT s for the database)"
    ).set_defaults(func=cmd_migrate)

    ev = sub.add_parser("events", help="incoming events, newest first; with an id, its handlings")
    ev.add_argument("id", nargs="?")
    ev.add_argument("--source")
    ev.add_argument("--limit", type=positive(int), default=20)
    ev.set_defaults(func=cmd_events)

    sub.add_parser(
        "mailboxes", help="the mailboxes beat polls, with their cursors and last successful poll"
    ).set_defaults(func=cmd_mailboxes)

    ep = sub.add_parser(
        "endpoints", help="outgoing webhook endpoints: add URL --events a,b | list | disable ID"
    )
    ep.add_argument("action", choices=["add", "list", "disable", "enable"])
    ep.add_argument("url", nargs="?", metavar="URL|ID")
    ep.add_argument("--events", default="*", help="comma-separated event types, '*' wildcards (default: all)")
    ep.add_argument("--secret", help="a whsec_ secret to sign with (default: a new one, printed once)")
    ep.add_argument("--description")
    ep.set_defaults(func=cmd_endpoints)

    ds = sub.add_parser("deliveries", help="outgoing webhook deliveries, newest first")
    ds.add_argument("--endpoint")
    ds.add_argument("--status", choices=[s.value for s in DeliveryStatus])
    ds.add_argument("--limit", type=positive(int), default=20)
    ds.set_defaults(func=cmd_deliveries)

    one_d = sub.add_parser("delivery", help="one delivery with every attempt")
    one_d.add_argument("id")
    one_d.set_defaults(func=cmd_delivery)

    tl = sub.add_parser("tools", help="the operations as LLM tool definitions (one JSON list)")
    tl.add_argument("--service", action="append", help="only this service (repeatable)")
    tl.add_argument("--agent", help="only the tools this agent may use (agents: in the services file)")
    tl.add_argument("--format", choices=["openai", "anthropic", "mcp", "json-schema"], default="openai")
    tl.add_argument("--strict", action="store_true", help="parameters in OpenAI's strict-mode subset")
    tl.set_defaults(func=cmd_tools)

    io = sub.add_parser("import-openapi", help="an OpenAPI 3.x / Swagger 2.0 document as a rest service")
    io.add_argument("spec", metavar="SPEC", help="the document (JSON or YAML file)")
    io.add_argument("--service", required=True, help="the new service's name")
    io.add_argument("--base-url", help="instead of the document's server URL")
    io.add_argument("--tag", action="append", help="only operations with this tag (repeatable)")
    io.add_argument("--operation", action="append", help="only this operationId (repeatable)")
    io.add_argument("--out", help="write a services file holding the service (default: print it)")
    io.add_argument("--merge", help="add the service to this services file")
    io.add_argument(
        "--allow-private-network", action="store_true", help="the API is on a private network (no SSRF guard)"
    )
    io.set_defaults(func=cmd_import_openapi)

    from integrations.auth.cli import add_commands as add_auth_commands

    add_auth_commands(sub)  # connections, keys

    tk = sub.add_parser("mcp-token", help="a new bearer token for AGENT on the MCP server (printed once)")
    tk.add_argument("agent")
    tk.add_argument("--file", help="the tokens file (default: MCP_TOKENS_FILE)")
    tk.set_defaults(func=cmd_mcp_token)


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The parser with the library's commands, and its sub-parsers for more."""
    p = argparse.ArgumentParser(prog="integrations", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    return p, sub


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and run one command. Every error is one line on stderr; no traceback."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except IntegrationError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(
            "error: timed out waiting for the result (the job goes on; see 'integrations jobs')",
            file=sys.stderr,
        )
        return 1
    except Exception as e:  # a broken database or broker: one line, not a traceback
        if _no_tables(e):
            print("error: the ledger has no tables yet: run 'integrations migrate'", file=sys.stderr)
            return 1
        print(f"error: {type(e).__name__}: {redact(_first_line(e))}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The library's commands alone (``python -m integrations.cli``); the installed
    ``integrations`` command adds those that need the Celery app (``tasks.cli``)."""
    return run(build_parser()[0], argv)


def _no_tables(e: BaseException) -> bool:
    """A ledger database that was never migrated: SQLite's "no such table", Postgres's
    undefined_table (SQLSTATE 42P01)."""
    orig = getattr(e, "orig", None)
    return "no such table" in str(orig) or getattr(orig, "sqlstate", None) == "42P01"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


if __name__ == "__main__":
    sys.exit(main())
