"""The ``integrations`` commands of events in and out: incoming events and the mailboxes beat
polls; outgoing webhook endpoints and their deliveries."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlsplit

from integrations.cli import _fmt, _table, positive
from integrations.errors import IntegrationError
from integrations.ledger.models import DeliveryStatus


def _shown_url(url: str) -> str:
    """An endpoint's URL as listed: its origin only, since a path or query may be the secret
    (Slack's and Discord's webhook URLs are)."""
    parts = urlsplit(url)
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{parts.netloc}{rest}"


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


def add_commands(sub: Any) -> None:
    """The commands of events in and out."""
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
