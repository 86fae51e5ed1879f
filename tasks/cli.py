"""The installed ``integrations`` command: the library's commands (``integrations.cli``) plus
those that need the Celery app: submitting, replaying, redelivering, serving the receiver."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from celery.exceptions import TimeoutError as ResultTimeout

from integrations import cli
from integrations.errors import IntegrationError


def cmd_call(args: argparse.Namespace) -> int:
    from integrations.jobs import resolve
    from tasks import call_service

    _, op = resolve(args.service, args.operation)
    params = cli.parse_params(args.params, op.parameters)
    result = call_service.delay(
        args.service,
        args.operation,
        params,
        idempotency_key=args.idempotency_key,
        agent=args.agent,
        connection=args.connection,
    )
    return _show(result, args)


def _show(result: Any, args: argparse.Namespace) -> int:
    if not args.wait:
        print(result.id)
        return 0
    try:
        out = result.get(timeout=args.timeout)
    except ResultTimeout:
        raise TimeoutError from None  # the command-line tool's one line: the job goes on
    except IntegrationError as e:
        print(f"job {result.id} failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tasks import replay

    return _show(replay(args.id), args)


def cmd_redeliver(args: argparse.Namespace) -> int:
    from integrations.ledger import deliveries
    from tasks.webhooks import deliver_webhook

    why_not = deliveries.redeliver(args.id)
    if why_not:
        raise IntegrationError(f"cannot redeliver {args.id}: {why_not}")
    deliver_webhook.delay(args.id)
    print(f"{args.id} queued for one more try")
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    from tasks.receiver import serve

    serve()
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from tasks.observe import serve_exporter

    serve_exporter()
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from tasks.tools import serve_mcp

    serve_mcp(http=args.http, agent=args.agent)
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    """Run Flower behind basic auth: the password from FLOWER_PASSWORD or FLOWER_PASSWORD_FILE
    goes to Flower through its environment (FLOWER_BASIC_AUTH), never through argv."""
    from integrations.config import get_settings

    s = get_settings()
    password = s.flower_password.get_secret_value() if s.flower_password is not None else ""
    if not password.strip():
        raise IntegrationError(
            "Flower needs a password: set FLOWER_PASSWORD or FLOWER_PASSWORD_FILE "
            "(and FLOWER_USER, default admin)"
        )
    if "," in password or "," in s.flower_user or ":" in s.flower_user:
        # Flower splits FLOWER_BASIC_AUTH into user:password pairs at commas.
        raise IntegrationError("FLOWER_USER and FLOWER_PASSWORD must not contain ',' (nor the user ':')")
    env = {**os.environ, "FLOWER_BASIC_AUTH": f"{s.flower_user}:{password}"}
    argv = ["celery", "-A", "tasks", "flower", f"--port={args.port}", f"--address={args.address}"]
    os.execve(sys.executable, [sys.executable, "-m", *argv], env)  # noqa: S606 (argv is ours)
    return 0  # not reached: Flower runs in this process now


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=cli.positive(float), default=60.0, help="seconds to wait with --wait")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli.build_parser()

    c = sub.add_parser("call", help="submit a job: SERVICE OPERATION key=value ...")
    c.add_argument("service")
    c.add_argument("operation")
    c.add_argument("params", nargs="*", metavar="key=value")
    c.add_argument("--idempotency-key")
    c.add_argument("--agent", help="who submits: the key of per-agent rate limits")
    c.add_argument("--connection", help="the end user's connection the job acts for (per-user services)")
    _wait_options(c)
    c.set_defaults(func=cmd_call)

    r = sub.add_parser("replay", help="submit a failed job again, as a new job linked to it")
    r.add_argument("id")
    _wait_options(r)
    r.set_defaults(func=cmd_replay)

    rd = sub.add_parser("redeliver", help="try a finished delivery once more (same webhook-id)")
    rd.add_argument("id")
    rd.set_defaults(func=cmd_redeliver)

    sub.add_parser("receiver", help="serve the webhook receiver on RECEIVER_HOST:RECEIVER_PORT").set_defaults(
        func=cmd_receiver
    )
    sub.add_parser(
        "metrics", help="serve Prometheus metrics on METRICS_HOST:METRICS_PORT (beside the workers)"
    ).set_defaults(func=cmd_metrics)
    m = sub.add_parser("mcp", help="serve the MCP server on stdio, or over Streamable HTTP with --http")
    m.add_argument("--http", action="store_true", help="Streamable HTTP on MCP_HOST:MCP_PORT (bearer tokens)")
    m.add_argument("--agent", help="stdio: the agent this server acts for (its tool set and rate limits)")
    m.set_defaults(func=cmd_mcp)

    f = sub.add_parser("flower", help="Flower behind basic auth (FLOWER_USER, FLOWER_PASSWORD or _FILE)")
    f.add_argument(
        "--port",
        type=cli.positive(int),
        default=os.environ.get("FLOWER_PORT") or "5555",
        help="default FLOWER_PORT, else 5555",
    )
    f.add_argument("--address", default=os.environ.get("FLOWER_ADDRESS") or "127.0.0.1")
    f.set_defaults(func=cmd_flower)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tasks.observe import cli_logging

    cli_logging()
    return cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
