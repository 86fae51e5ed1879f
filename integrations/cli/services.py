"""The ``integrations`` commands that set a deployment up: services (check the services file and
list what it declares) and migrate (bring the ledger's schema up to date)."""

from __future__ import annotations

import argparse
from typing import Any

from integrations.redact import redact


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


def add_commands(sub: Any) -> None:
    """The commands that check the services file and migrate the ledger."""
    sub.add_parser(
        "services", help="validate the services file and list services, webhook sources and mailboxes"
    ).set_defaults(func=cmd_services)
    sub.add_parser(
        "migrate", help="apply the ledger's migrations (waiting up to MIGRATE_WAIT s for the database)"
    ).set_defaults(func=cmd_migrate)
