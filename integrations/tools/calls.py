"""A model's tool call as a job, and the job's outcome as the tool result the model reads.

:func:`run` takes a call as the provider returns it, an OpenAI ``tool_calls[i]``
(https://platform.openai.com/docs/api-reference/chat/object) or an Anthropic ``tool_use``
block (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use), and
answers in the same provider's format: a ``tool`` message or a ``tool_result`` block. Every
problem (an unknown tool, bad arguments, a failed job, a job still running) is a result the
model can read, with the job id when there is a job; only a call that is neither shape raises.

The library does not know the Celery app: a :class:`Submitter` puts jobs on it and reads their
results (``tasks.tools.submitter``; ``tasks.tools.run`` is this ``run`` with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from integrations.errors import IntegrationError, InvalidParams, SubmitError
from integrations.jobs import PARAMS_DEPTH_MAX
from integrations.jsonlimits import too_deep
from integrations.ledger import reads
from integrations.tools.definitions import index

log = logging.getLogger(__name__)

Provider = Literal["openai", "anthropic"]
#: Statuses of a job that has finished.
FINISHED = ("succeeded", "failed")


class Submitter(Protocol):
    """Puts jobs on the queue and reads their results (the app layer implements it)."""

    def submit(
        self,
        service: str,
        operation: str,
        params: dict[str, Any],
        idempotency_key: str | None,
        agent: str | None,
        connection: str | None = None,
    ) -> str:
        """Accept a job (raising :class:`SubmitError` when it is refused); return its id."""
        ...

    def result(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The finished job's result (``{job_id, status, status_code, data, ...}``); ``None``
        when it has not finished within ``timeout`` seconds; raises the job's error when it failed."""
        ...


@dataclass(frozen=True)
class ToolCall:
    provider: Provider
    id: str
    name: str
    arguments: Any
    #: Why the arguments could not be read (OpenAI sends them as JSON text), else ``None``.
    problem: str | None = None


def parse_call(tool_call: Any) -> ToolCall:
    """An OpenAI tool call or an Anthropic ``tool_use`` block (a mapping, or an SDK object with
    ``model_dump``). Raises :class:`InvalidParams` for anything else."""
    data = tool_call.model_dump() if hasattr(tool_call, "model_dump") else tool_call
    if not isinstance(data, Mapping) or not isinstance(data.get("id"), str) or not data["id"]:
        raise InvalidParams(
            "a tool call is an OpenAI tool_calls entry or an Anthropic tool_use block, with an id"
        )
    if data.get("type") == "tool_use":
        return ToolCall("anthropic", data["id"], str(data.get("name", "")), data.get("input") or {})
    function = data.get("function")
    if isinstance(function, Mapping):
        raw = function.get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except (ValueError, RecursionError):
            return ToolCall(
                "openai", data["id"], str(function.get("name", "")), None, "arguments are not JSON"
            )
        return ToolCall("openai", data["id"], str(function.get("name", "")), arguments)
    raise InvalidParams(
        "a tool call is an OpenAI tool_calls entry or an Anthropic tool_use block, with an id"
    )


def idempotency_key(
    source: str, call_id: str, agent: str | None, arguments: Any = None, connection: str | None = None
) -> str:
    """The same key for the same call (id and arguments) of the same agent and end user, so a
    call run twice is one job; the parts hashed as a JSON list, so no two calls share a key
    however their names are spelt, and a model that reuses an id for other arguments gets a
    new job, not an earlier call's result."""
    try:  # the nulls a strict-mode model sends for what it leaves out change nothing
        parts = json.dumps(
            [source, agent, call_id, connection, _no_nulls(arguments)], sort_keys=True, default=str
        )
    except (ValueError, RecursionError):  # arguments refused before any job is made
        parts = json.dumps([source, agent, call_id, connection])
    return "tool:" + hashlib.sha256(parts.encode()).hexdigest()


def _no_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    return [_no_nulls(v) for v in value] if isinstance(value, list) else value


def drop_nulls(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` without the ``null``s a strict-mode model sends for optional properties it
    leaves out (those the schema does not require), however deep."""
    if not isinstance(value, dict):
        if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
            return [drop_nulls(v, schema["items"]) for v in value]
        return value
    found = schema.get("properties")
    props: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    needed = set(schema.get("required") or ())
    return {
        k: drop_nulls(v, props.get(k) or {}) if isinstance(props.get(k), Mapping) else v
        for k, v in value.items()
        if v is not None or k in needed
    }


def call_tool(
    name: str,
    arguments: Any,
    submitter: Submitter,
    *,
    agent: str | None,
    wait: float,
    key: str | None,
    connection: str | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Submit tool ``name`` as a job and wait up to ``wait`` seconds: ``(is_error, payload)``.

    ``connection`` names the end user a tool of a per-user service acts for."""
    tool = index(agent).get(name)
    if tool is None:
        log.warning("tool call refused: %.80r is not a tool agent %s may use", name, agent or "-")
        return True, {"error": f"no tool named {name[:80]!r} is available to this agent"}
    if not isinstance(arguments, dict):
        return True, {"error": "the arguments must be a JSON object"}
    if too_deep(arguments, PARAMS_DEPTH_MAX):
        return True, {"error": f"the arguments are nested deeper than {PARAMS_DEPTH_MAX} levels"}
    if tool.per_user and connection is None:
        return True, {"error": f"tool {tool.name} acts for an end user: it runs with a connection"}
    try:
        job_id = submitter.submit(
            tool.service, tool.operation, drop_nulls(arguments, tool.parameters), key, agent, connection
        )
    except (SubmitError, InvalidParams) as e:
        return True, {"error": str(e)}
    return outcome(job_id, submitter, wait)


def outcome(job_id: str, submitter: Submitter, wait: float) -> tuple[bool, dict[str, Any]]:
    """What job ``job_id`` came to within ``wait`` seconds: ``(is_error, payload)``."""
    try:
        result = submitter.result(job_id, wait)
    except IntegrationError as e:
        return True, {"job_id": job_id, "status": "failed", "error": str(e)}
    if result is None:
        job = reads.get_job(job_id)
        status = job["status"] if job else "queued"
        return False, {
            "job_id": job_id,
            "status": str(status),
            "message": "the job has not finished yet; ask again with the job_status tool and this job_id",
        }
    return False, {k: result.get(k) for k in ("job_id", "status", "status_code", "data") if k in result}


def job_status(job_id: Any, submitter: Submitter, *, agent: str | None) -> tuple[bool, dict[str, Any]]:
    """Job ``job_id`` as :func:`outcome` shows it, if ``agent`` submitted it (when given)."""
    job = reads.get_job(job_id) if isinstance(job_id, str) and 0 < len(job_id) <= 64 else None
    if job is None or (agent is not None and job.get("agent") != agent):
        return True, {"error": "no job with this id was submitted by this agent"}
    if job["status"] == "failed":
        return True, {"job_id": job_id, "status": "failed", "error": job.get("error")}
    if job["status"] != "succeeded":
        return False, {"job_id": job_id, "status": str(job["status"]), "attempts": job.get("attempts")}
    return outcome(job_id, submitter, 2.0)


def run(
    tool_call: Any,
    submitter: Submitter,
    *,
    agent: str | None = None,
    wait: float = 30.0,
    connection: str | None = None,
) -> dict[str, Any]:
    """Run a model's tool call as a job; the tool result in the provider's format.

    The job's idempotency key comes from the call id: the same call run again is the same job.
    ``agent`` names the caller (its tool set and its rate limits); ``wait`` is how long to wait
    for the job before answering with its id and status instead; ``connection`` is the end user
    the agent acts for, which a tool of a per-user service (OAuth2) needs."""
    call = parse_call(tool_call)
    if call.problem is not None:
        is_error, payload = True, {"error": call.problem}
    else:
        key = idempotency_key(call.provider, call.id, agent, call.arguments, connection)
        is_error, payload = call_tool(
            call.name, call.arguments, submitter, agent=agent, wait=wait, key=key, connection=connection
        )
    return tool_result(call, is_error, payload)


def tool_result(call: ToolCall, is_error: bool, payload: dict[str, Any]) -> dict[str, Any]:
    """The answer to ``call`` in its provider's format, ``payload`` as JSON text."""
    content = json.dumps(payload, default=str)
    if call.provider == "openai":
        return {"role": "tool", "tool_call_id": call.id, "content": content}
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call.id, "content": content}
    if is_error:
        result["is_error"] = True
    return result
