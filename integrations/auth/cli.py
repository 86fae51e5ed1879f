"""``integrations connections ...`` and ``integrations keys ...``: end users' connections and the
keys their tokens are encrypted with. No command ever prints a token."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from integrations.errors import IntegrationError


def _service(name: str) -> Any:
    from integrations.services import get_services

    services = get_services()
    svc = services.get(name)
    if svc is None:
        raise IntegrationError(f"unknown service (known: {', '.join(sorted(services)) or 'none'})")
    return svc


def _read_token(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as e:
        raise IntegrationError(f"{what}: cannot read {path} ({e.strerror})") from None
    if not value or any(c.isspace() for c in value):
        raise IntegrationError(f"{what}: {path} must hold one token on one line")
    return value


def cmd_add(args: argparse.Namespace) -> int:
    from integrations.auth import authorize, per_user, token_auth, tokens
    from integrations.auth.endpoints import Tokens
    from integrations.jobs import valid_name
    from integrations.ledger import connections as ledger
    from integrations.ledger.models import ConnectionStatus

    svc = _service(args.service)
    if not valid_name(args.name):
        raise IntegrationError(
            "a connection name is 1 to 100 letters, digits or '_.:@-', starting with a letter or digit"
        )
    auth = token_auth(svc)
    if auth is None or not per_user(svc):
        kind = auth.type if auth is not None else getattr(getattr(svc, "auth", None), "type", svc.kind)
        raise IntegrationError(
            f"service {svc.name} authenticates as itself ({kind}); it has no per-user connections"
        )
    if args.access_token_file:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=args.expires_in) if args.expires_in else None
        refresh = (
            _read_token(args.refresh_token_file, "--refresh-token-file") if args.refresh_token_file else None
        )
        granted = Tokens(_read_token(args.access_token_file, "--access-token-file"), refresh, expires)
        tokens.store(svc, args.name, granted)
        print(f"connection {args.name} of {svc.name} is active (tokens from files, encrypted in the ledger)")
        return 0
    if args.refresh_token_file:
        raise IntegrationError("--refresh-token-file goes with --access-token-file")
    if auth.type in ("oauth2_jwt_bearer", "github_app"):
        if not args.subject:
            what = "the user to act as" if auth.type == "oauth2_jwt_bearer" else "the installation id"
            raise IntegrationError(f"service {svc.name} needs --subject ({what}) for each connection")
        ledger.ensure(svc.name, args.name, ConnectionStatus.ACTIVE, args.subject)
        with tokens.single_flight(svc, args.name), ledger.for_refresh(svc.name, args.name) as held:
            held.reset(args.subject)
        print(f"connection {args.name} of {svc.name} is active (as {args.subject}); token on first use")
        return 0
    url = authorize.start(svc, args.name)
    print(f"Open this URL as the user of connection {args.name} (valid for 10 minutes):")
    print(url)
    return 0


_COLS = ["service", "name", "status", "subject", "scopes", "expires_at", "refreshed_at", "last_error"]


def _shown(row: Any) -> dict[str, Any]:
    out = {c: getattr(row, c) for c in _COLS}
    out["scopes"] = " ".join(row.scopes) if row.scopes else None
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from integrations.cli import _table
    from integrations.ledger import connections as ledger

    rows = ledger.list_connections(args.service)
    if not rows:
        print("no connections")
        return 0
    print(_table([_shown(r) for r in rows], _COLS))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from integrations.cli import _fmt
    from integrations.ledger import connections as ledger

    rows = ledger.list_connections(args.service, args.name)
    if not rows:
        raise IntegrationError(f"no connection named {args.name}")
    for n, row in enumerate(rows):
        if n:
            print()
        for key, value in {**_shown(row), "created_at": row.created_at, "updated_at": row.updated_at}.items():
            print(f"{key:>13}: {_fmt(value)}")
        held = f"stored, encrypted with key {row.key_id} (never shown)" if row.tokens else "none"
        print(f"{'tokens':>13}: {held}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from integrations.auth import token_auth, tokens
    from integrations.ledger import connections as ledger

    rows = ledger.list_connections(args.service, args.name)
    if not rows:
        raise IntegrationError(f"no connection named {args.name}")
    if len(rows) > 1:
        raise IntegrationError(f"connections named {args.name} in several services: give --service")
    svc = _service(rows[0].service)
    if token_auth(svc) is None:
        raise IntegrationError(f"service {svc.name} no longer has a token-based auth")
    told = tokens.revoke(svc, args.name, remote=not args.local_only)
    where = "revoked at the provider and " if told else ""
    note = "" if told or args.local_only else " (the provider has no revocation endpoint configured)"
    print(f"connection {args.name} of {svc.name} {where}its tokens deleted{note}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from integrations.auth import keys

    if args.action == "generate":
        print(keys.generate())
        return 0
    if args.action == "rotate":
        return _rotate(keys.get_keys(), args.batch)
    return _status(keys.get_keys())


def _rotate(k: Any, batch: int) -> int:
    from integrations.ledger import connections as ledger

    done = changed = 0
    after: tuple[str, Any] = ("connections", 0)
    while True:
        found = ledger.encrypted_rows(k.primary, after, batch)
        if not found:
            break
        for table, key, old, version in found:
            new, key_id = k.rotate(old)
            if ledger.replace_encrypted(table, key, old, version, new, key_id):
                done += 1
            else:
                changed += 1  # rewritten meanwhile, by a worker with the newest key
            after = (table, key)
    left = {key_id: n for key_id, n in ledger.key_counts().items() if key_id != k.primary}
    print(f"re-encrypted {done} values with key {k.primary}; {changed} changed meanwhile")
    if left:
        print("still under older keys: " + ", ".join(f"{key_id} ({n})" for key_id, n in sorted(left.items())))
        print("run 'integrations keys rotate' again (workers still using an older key list wrote them)")
        return 1
    print("no value needs an older key any more: they can be removed from INTEGRATIONS_KEYS")
    return 0


def _status(k: Any) -> int:
    from integrations.ledger import connections as ledger

    counts = ledger.key_counts()
    for n, key_id in enumerate(k.ids, 1):
        role = "encrypts" if n == 1 else "decrypts"
        print(f"key {n} ({key_id}, {role}): {counts.pop(key_id, 0)} values")
    for key_id, n in sorted(counts.items()):
        print(f"key {key_id} (NOT in INTEGRATIONS_KEYS): {n} values cannot be read")
    return 1 if counts else 0


def add_commands(sub: Any) -> None:
    from integrations.cli import positive  # the command-line tool is loaded by now

    c = sub.add_parser("connections", help="end users' connections: add | list | show | revoke")
    csub = c.add_subparsers(dest="action", required=True)

    add = csub.add_parser("add", help="authorize a connection: prints the URL its user opens")
    add.add_argument("service")
    add.add_argument("name")
    add.add_argument("--access-token-file", help="a token obtained elsewhere, instead of authorizing")
    add.add_argument("--refresh-token-file", help="its refresh token")
    add.add_argument("--expires-in", type=int, help="seconds the access token from the file is valid")
    add.add_argument(
        "--subject", help="oauth2_jwt_bearer: the user to act as; github_app: the installation id"
    )
    add.set_defaults(func=cmd_add)

    ls = csub.add_parser("list", help="connections, their status and expiry (never their tokens)")
    ls.add_argument("--service")
    ls.set_defaults(func=cmd_list)

    show = csub.add_parser("show", help="one connection (in every service that has one by that name)")
    show.add_argument("name")
    show.add_argument("--service")
    show.set_defaults(func=cmd_show)

    rv = csub.add_parser("revoke", help="revoke at the provider (RFC 7009) and delete the tokens")
    rv.add_argument("name")
    rv.add_argument("--service")
    rv.add_argument(
        "--local-only", action="store_true", help="delete the tokens without telling the provider"
    )
    rv.set_defaults(func=cmd_revoke)

    k = sub.add_parser("keys", help="the keys of tokens at rest: generate | rotate | status")
    k.add_argument("action", choices=["generate", "rotate", "status"])
    k.add_argument("--batch", type=positive(int), default=200, help="rotate: rows per batch")
    k.set_defaults(func=cmd_keys)
