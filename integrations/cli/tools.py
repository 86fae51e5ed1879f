"""The ``integrations`` commands of operations as tools: their definitions for an LLM, an OpenAPI
document imported as a service, a bearer token for the MCP server."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from integrations.errors import IntegrationError


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
    """The commands of tool definitions and OpenAPI import."""
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


def add_mcp_token_command(sub: Any) -> None:
    """The command that makes a bearer token for the MCP server."""
    tk = sub.add_parser("mcp-token", help="a new bearer token for AGENT on the MCP server (printed once)")
    tk.add_argument("agent")
    tk.add_argument("--file", help="the tokens file (default: MCP_TOKENS_FILE)")
    tk.set_defaults(func=cmd_mcp_token)
