"""The MCP server: every operation the calling agent may use as a tool, plus ``job_status``.

Built on the official ``mcp`` SDK's low-level ``Server``. ``tools/call`` submits a job and waits
up to ``MCP_WAIT`` seconds: the result if the job finished, else its id and status, to ask again
with ``job_status(job_id)``. Tool errors are ``isError`` results with our error's message.

Over Streamable HTTP (https://modelcontextprotocol.io/specification/2025-06-18/basic/transports)
each request carries a bearer token of one agent: ``MCP_TOKENS_FILE`` holds SHA-256 hashes of
the tokens, never the tokens. The agent's calls are attributed to it (ledger, per-agent rate
limits) and limited to its tool set. A missing or unknown token is refused with 401, and an
``Origin`` or ``Host`` that is not allowed with 403 / 421 (the spec's DNS-rebinding protection);
every refusal is logged without the token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.authentication import AuthCredentials
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from integrations.config import Settings, get_settings
from integrations.errors import ConfigError
from integrations.observability import logs
from integrations.tools import calls
from integrations.tools.calls import Submitter
from integrations.tools.definitions import render, tools

log = logging.getLogger("integrations.mcp")

JOB_STATUS = "job_status"
JOB_STATUS_TOOL = types.Tool(
    name=JOB_STATUS,
    description="The status of a job a tool call started and did not finish in time; its result once it has.",
    input_schema={
        "type": "object",
        "properties": {"job_id": {"type": "string", "description": "the job_id a tool call answered with"}},
        "required": ["job_id"],
        "additionalProperties": False,
    },
)
_TOKEN_LINE = re.compile(r"^([0-9a-f]{64})\s+([A-Za-z0-9][A-Za-z0-9_.:@-]{0,99})$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def token_hash(token: str) -> str:
    """What the tokens file keeps of a token (tokens are long random strings: no salt needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """``{token hash: agent}`` from a tokens file (``<sha256 hex> <agent>`` per line, ``#`` comments)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"MCP_TOKENS_FILE: cannot read {path} ({e.strerror})") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _TOKEN_LINE.match(line)
        if m is None:
            raise ConfigError(f"MCP_TOKENS_FILE line {number}: expected '<sha256 of the token, hex> <agent>'")
        tokens[m.group(1)] = m.group(2)
    return tokens


class TokensFile:
    """The tokens file as it is now: read again when it changes, so a line removed revokes its
    token and a line added (``integrations mcp-token``) admits one, without a restart. A file
    that turns unreadable or malformed admits no one until it is fixed (logged)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._tokens = load_tokens(path)  # at start, a bad file stops the server
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def agent(self, token_digest: str) -> str | None:
        stamp = self._stamp()
        if stamp != self._seen:
            self._seen = stamp
            try:
                self._tokens = load_tokens(self.path)
            except ConfigError as e:
                self._tokens = {}
                log.error("MCP tokens file not read; every request is refused until it is fixed: %s", e)
        return self._tokens.get(token_digest)


def build_server(
    submitter: Submitter, agent_of: Callable[[ServerRequestContext[Any]], str | None]
) -> Server[Any]:
    """The MCP server; ``agent_of(ctx)`` names the agent a request comes from."""
    wait = get_settings().mcp_wait
    process = uuid.uuid4().hex  # calls of one stdio process are told apart by their request ids

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        agent = agent_of(ctx)
        found = await anyio.to_thread.run_sync(lambda: tools(agent=agent))
        # A per-user service's tools need an end user's connection, which MCP cannot name.
        listed = [render(t, "mcp") for t in found if not t.per_user]
        return types.ListToolsResult(
            tools=[
                types.Tool(name=t["name"], description=t["description"], input_schema=t["inputSchema"])
                for t in listed
            ]
            + [JOB_STATUS_TOOL]
        )

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        agent = agent_of(ctx)
        args = params.arguments or {}
        if params.name == JOB_STATUS:
            is_error, payload = await anyio.to_thread.run_sync(
                lambda: calls.job_status(args.get("job_id"), submitter, agent=agent)
            )
        else:
            session = ctx.request.headers.get("mcp-session-id") if ctx.request is not None else process
            # Within one session a request id names one call; without a session it names nothing.
            key = (
                "mcp:" + hashlib.sha256(json.dumps([agent, session, ctx.request_id]).encode()).hexdigest()
                if session
                else None
            )
            is_error, payload = await anyio.to_thread.run_sync(
                lambda: calls.call_tool(params.name, args, submitter, agent=agent, wait=wait, key=key)
            )
        return types.CallToolResult(
            content=[types.TextContent(text=json.dumps(payload, default=str))],
            structured_content=json.loads(json.dumps(payload, default=str)),
            is_error=is_error,
        )

    return Server("agent-integrations", version="0.1.0", on_list_tools=list_tools, on_call_tool=call_tool)


def serve_stdio(submitter: Submitter, *, agent: str | None) -> None:
    """Serve on stdin/stdout as ``agent`` (the stdio client started this process: it is trusted)."""
    from mcp.server.stdio import stdio_server

    server = build_server(submitter, lambda ctx: agent)

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)


def _agent_of_request(ctx: ServerRequestContext[Any]) -> str | None:
    user = ctx.request.scope.get("user") if ctx.request is not None else None
    if not isinstance(user, AuthenticatedUser):
        raise PermissionError("no agent")  # BearerGate lets no request through without one
    return user.access_token.client_id


def _listed(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def security(settings: Settings) -> TransportSecuritySettings:
    """The ``Host`` and ``Origin`` values the HTTP transport answers."""
    hosts = [*LOOPBACK_HOSTS, settings.mcp_host, *_listed(settings.mcp_allowed_hosts)]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[h for host in dict.fromkeys(hosts) for h in (host, f"{host}:*")],
        allowed_origins=[
            *(f"http://{h}:*" for h in LOOPBACK_HOSTS),
            *(f"http://{h}" for h in LOOPBACK_HOSTS),
            *_listed(settings.mcp_allowed_origins),
        ],
    )


class BearerGate:
    """Lets through the HTTP requests with an allowed ``Origin`` (or none) and a known bearer
    token, as that token's agent (the SDK's ``AuthenticatedUser``, which also binds each MCP
    session to its agent)."""

    def __init__(self, app: ASGIApp, tokens: TokensFile, allowed: TransportSecuritySettings) -> None:
        self.app, self.tokens, self.allowed = app, tokens, allowed

    def _origin_ok(self, origin: str | None) -> bool:
        if not origin:
            return True  # not a browser: the token decides
        return any(
            origin == o or (o.endswith(":*") and origin.startswith(o[:-1]) and origin[len(o) - 1 :].isdigit())
            for o in self.allowed.allowed_origins
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        client = (scope.get("client") or ("?", 0))[0]
        if not self._origin_ok(headers.get("origin")):
            log.warning("MCP request from %s refused: Origin not allowed", client)
            await JSONResponse({"error": "origin not allowed"}, status_code=403)(scope, receive, send)
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        agent = (
            self.tokens.agent(token_hash(token.strip()))
            if scheme.lower() == "bearer" and token.strip()
            else None
        )
        if agent is None:
            why = "unknown bearer token" if token.strip() else "no bearer token"
            log.warning("MCP request from %s refused: %s", client, why)
            await JSONResponse(
                {"error": "invalid_token", "error_description": why},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )(scope, receive, send)
            return
        user = AuthenticatedUser(AccessToken(token=token_hash(token.strip()), client_id=agent, scopes=[]))
        await self.app({**scope, "user": user, "auth": AuthCredentials([])}, receive, send)


def http_app(submitter: Submitter, settings: Settings | None = None) -> ASGIApp:
    """The Streamable HTTP app at ``/mcp``, behind :class:`BearerGate`."""
    settings = settings or get_settings()
    if settings.mcp_tokens_file is None:
        raise ConfigError("MCP_TOKENS_FILE: set it to a tokens file (integrations mcp-token AGENT makes one)")
    tokens = TokensFile(settings.mcp_tokens_file)
    allowed = security(settings)
    server = build_server(submitter, _agent_of_request)
    app = server.streamable_http_app(transport_security=allowed, host=settings.mcp_host)
    return BearerGate(app, tokens, allowed)


def serve_http(submitter: Submitter) -> None:
    import uvicorn

    s = get_settings()
    logs.setup(s.log_level, s.log_format)  # redacting, in LOG_FORMAT; uvicorn's lines too
    # sse_starlette logs every event it sends at DEBUG: tool results (rows, files, mail).
    logging.getLogger("sse_starlette").setLevel(max(logging.INFO, logging.getLogger().level))
    app = http_app(submitter, s)
    log.warning("MCP over Streamable HTTP at http://%s:%s/mcp", s.mcp_host, s.mcp_port)
    uvicorn.run(
        app,
        host=s.mcp_host,
        port=s.mcp_port,
        log_level=s.log_level.lower(),
        access_log=False,
        log_config=None,
    )
