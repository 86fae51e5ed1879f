"""Operations as LLM tools: definitions for OpenAI, Anthropic, MCP and plain JSON Schema
(:mod:`.definitions`), a model's tool calls run as jobs (:mod:`.calls`), per-agent tool sets
(:mod:`.agents`), the MCP server (:mod:`.mcp_server`) and the OpenAPI import (:mod:`.openapi`).

``run`` needs a :class:`~integrations.tools.calls.Submitter` (the library does not know the
Celery app); ``tasks.tools.run`` is the same with the app's own.
"""

from integrations.tools.calls import Submitter, job_status, parse_call, run, tool_result
from integrations.tools.definitions import FORMATS, Tool, definitions, tool_name, tools

__all__ = [
    "FORMATS",
    "Submitter",
    "Tool",
    "definitions",
    "job_status",
    "parse_call",
    "run",
    "tool_name",
    "tool_result",
    "tools",
]
