"""LLM tools and the MCP server as the app runs them: the library's, submitting to the workers.

``run(tool_call, agent=..., wait=...)`` runs a model's tool call as a job and answers with the
tool result (:func:`integrations.tools.calls.run` with :data:`submitter`); ``serve_mcp`` serves
the MCP server over stdio or Streamable HTTP (``integrations mcp [--http]``).
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import TimeoutError as ResultTimeout

from integrations.tools import calls
from tasks.calls import call_service


class CelerySubmitter:
    """Jobs through ``call_service``; results from the result backend."""

    def submit(
        self,
        service: str,
        operation: str,
        params: dict[str, Any],
        idempotency_key: str | None,
        agent: str | None,
        connection: str | None = None,
    ) -> str:
        result = call_service.delay(
            service, operation, params, idempotency_key=idempotency_key, agent=agent, connection=connection
        )
        return str(result.id)

    def result(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        try:
            out = call_service.AsyncResult(job_id).get(timeout=max(timeout, 0.01), propagate=True)
        except ResultTimeout:
            return None
        return out if isinstance(out, dict) else {"job_id": job_id, "status": "succeeded", "data": out}


submitter = CelerySubmitter()


def run(
    tool_call: Any, *, agent: str | None = None, wait: float = 30.0, connection: str | None = None
) -> dict[str, Any]:
    """A model's tool call (OpenAI ``tool_calls[i]`` or Anthropic ``tool_use``) as a job; the
    tool result in the provider's format (see :func:`integrations.tools.calls.run`);
    ``connection``: the end user a per-user service's tool acts for."""
    return calls.run(tool_call, submitter, agent=agent, wait=wait, connection=connection)


def serve_mcp(*, http: bool, agent: str | None) -> None:
    """The MCP server on stdio (as ``agent``), or over Streamable HTTP on ``MCP_HOST:MCP_PORT``."""
    from integrations.tools import mcp_server

    if http:
        mcp_server.serve_http(submitter)
    else:
        mcp_server.serve_stdio(submitter, agent=agent)
