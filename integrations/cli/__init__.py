"""The ``integrations`` command: read the ledger, check the services file, manage endpoints.

The commands that submit jobs or serve the receiver need the Celery app and live in
``tasks.cli``, which adds them to these. Every error is one line on stderr and a non-zero exit;
no traceback reaches the user.

This module holds the parser, ``run`` and the helpers the commands share (argument types, the
table printer); each group of commands is a module of its own: ``jobs``, ``services``,
``events``, ``tools`` (connections and keys: ``integrations.auth.cli``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from integrations.errors import IntegrationError
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


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def add_commands(sub: Any) -> None:
    """The commands that read and manage the ledger and the services file (no Celery app)."""
    from integrations.auth.cli import add_commands as add_auth_commands
    from integrations.cli import events, jobs, services, tools

    # In this order, the order --help lists them in.
    jobs.add_commands(sub)  # jobs, job, stats, health, prune
    services.add_commands(sub)  # services, migrate
    events.add_commands(sub)  # events, mailboxes, endpoints, deliveries, delivery
    tools.add_commands(sub)  # tools, import-openapi
    add_auth_commands(sub)  # connections, keys
    tools.add_mcp_token_command(sub)  # mcp-token


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
