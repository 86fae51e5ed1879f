"""Every operation as an LLM tool: its name, description and parameters, in each provider's shape.

- ``openai``: a Chat Completions ``tools`` entry, ``{"type": "function", "function": {"name",
  "description", "parameters"}}`` (https://platform.openai.com/docs/api-reference/chat/create);
- ``anthropic``: ``{"name", "description", "input_schema"}``
  (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use);
- ``mcp``: the MCP ``Tool``, ``{"name", "description", "inputSchema"}``
  (https://modelcontextprotocol.io/specification/2025-06-18/server/tools);
- ``json-schema``: the parameters schema itself, with ``$schema``, ``title`` (the tool's name)
  and ``description``.

Names are ``service__operation``, valid for every provider (``^[a-zA-Z0-9_-]{1,64}$``): a name
that is not is made valid and given a hash of the original, so it is stable and unique.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from integrations.auth import per_user
from integrations.errors import ConfigError, UnknownService
from integrations.services import Operation, Service, get_services
from integrations.tools import agents as agents_
from integrations.tools.strict import strict_schema

Format = Literal["openai", "anthropic", "mcp", "json-schema"]
FORMATS: tuple[Format, ...] = ("openai", "anthropic", "mcp", "json-schema")
SEP = "__"
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class Tool:
    name: str
    service: str
    operation: str
    description: str
    parameters: dict[str, Any]
    #: Whether it acts for an end user's connection (OAuth2): run with ``connection=``; the MCP
    #: server, which cannot name one, leaves it out.
    per_user: bool = False


def tool_name(service: str, operation: str) -> str:
    """``service__operation`` when that is a valid name; else its invalid characters made
    ``_``, cut to fit, with ``_`` and 8 hex digits of its SHA-256 (the same name every time)."""
    name = f"{service}{SEP}{operation}"
    if NAME.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[: 64 - 9] + "_" + digest


def describe(svc: Service, name: str, op: Operation) -> str:
    """The operation's own description, or how it is called; then which service it belongs to."""
    text = op.description.strip() or f"{svc.describe_operation(name, op)}".strip() or name
    about = svc.description.strip().splitlines()[0] if svc.description.strip() else ""
    return f"{text}\n\nService {svc.name}: {about}" if about else f"{text}\n\nService: {svc.name}"


def tools(services: Iterable[str] | None = None, agent: str | None = None) -> list[Tool]:
    """The tools of ``services`` (default: all) that ``agent`` may use, in services-file order.

    Raises :class:`UnknownService` for a service that is not in the file, and
    :class:`ConfigError` when two operations would get the same tool name."""
    known = get_services()
    chosen = list(known) if services is None else list(services)
    for name in chosen:
        if name not in known:
            raise UnknownService(f"unknown service {name!r} (known: {', '.join(sorted(known))})")
    out: dict[str, Tool] = {}
    for service in chosen:
        svc = known[service]
        for op_name, op in svc.catalog().items():
            if not agents_.allowed(agent, service, op_name):
                continue
            tool = Tool(
                tool_name(service, op_name),
                service,
                op_name,
                describe(svc, op_name, op),
                op.parameters,
                per_user(svc),
            )
            other = out.get(tool.name)
            if other is not None:
                raise ConfigError(
                    f"tool name {tool.name} stands for both {other.service}.{other.operation} and "
                    f"{service}.{op_name}: rename one"
                )
            out[tool.name] = tool
    return list(out.values())


def index(agent: str | None = None) -> dict[str, Tool]:
    """The tools ``agent`` may use, by name."""
    return {t.name: t for t in tools(agent=agent)}


def render(tool: Tool, format: Format = "openai", strict: bool = False) -> dict[str, Any]:
    """``tool`` in ``format``'s shape. With ``strict``, the parameters in OpenAI's strict-mode
    subset (:mod:`integrations.tools.strict`) and ``"strict": true`` in the OpenAI shape; a
    tool whose parameters that subset cannot express keeps its schema and is not marked strict."""
    params = tool.parameters
    strict_params = strict_schema(params) if strict else None
    if strict_params is not None:
        params = strict_params
    if format == "openai":
        function: dict[str, Any] = {"name": tool.name, "description": tool.description, "parameters": params}
        if strict_params is not None:
            function["strict"] = True
        return {"type": "function", "function": function}
    if format == "anthropic":
        return {"name": tool.name, "description": tool.description, "input_schema": params}
    if format == "mcp":
        return {"name": tool.name, "description": tool.description, "inputSchema": params}
    if format == "json-schema":
        return {"$schema": SCHEMA_DIALECT, "title": tool.name, **params, "description": tool.description}
    raise ValueError(f"unknown format; one of {', '.join(FORMATS)}")


def definitions(
    format: Format = "openai",
    services: Iterable[str] | None = None,
    agent: str | None = None,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """The tool definitions of every operation (or of ``services``) that ``agent`` may use."""
    if format not in FORMATS:
        raise ValueError(f"unknown format; one of {', '.join(FORMATS)}")
    return [render(t, format, strict) for t in tools(services, agent)]
