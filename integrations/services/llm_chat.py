"""The ``chat`` operation of the ``llm`` kind: its parameters, the one shape of its result, and
what a wire protocol (:mod:`llm_openai`, :mod:`llm_anthropic`) provides.

Params are neutral: ``messages`` of roles ``system``, ``user``, ``assistant`` (text and the
tool calls it made, as a chat result gives them) and ``tool`` (a tool's result), ``system``,
``tools`` (JSON Schema functions), ``tool_choice``, ``response_format`` (a JSON Schema the answer
follows), ``max_tokens``, ``temperature``, ``model``. Each wire protocol turns them into its
request body and its answer into :class:`ChatResult`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, Literal, Protocol, TypedDict

from pydantic import Field

from integrations import http, jsonlimits, redact
from integrations.errors import CallError, InvalidParams, PermanentError, RateLimited, TransientError
from integrations.services.base import Operation
from integrations.services.params import check_schema, object_schema

ProtocolName = Literal["openai", "anthropic"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "other"]
#: Tool and response names every provider accepts.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
#: Characters of a provider's error message kept in an error.
MESSAGE_MAX = 300


class ToolCall(TypedDict):
    id: str
    name: str
    #: The parsed JSON; the model's text as it is when that is not valid JSON.
    arguments: Any


class ChatResult(TypedDict):
    text: str
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    #: The provider's own reason (``end_turn``, ``stop``, ``max_tokens``, ...).
    stop_reason: str | None
    model: str
    usage: dict[str, int] | None


class Wire(Protocol):
    """One wire protocol: where chat goes, its body, its answer, its errors."""

    chat_path: str
    models_path: str

    def headers(self) -> dict[str, str]: ...

    def body(self, params: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]: ...

    def result(self, data: Any, params: dict[str, Any], model: str) -> ChatResult:
        """The normalised answer; raises PermanentError when the body is not a chat answer."""
        ...

    def error(self, resp: http.Response, model: str, retry_after_max: float) -> CallError | None:
        """The error a response stands for (``None`` for 2xx), in ONE place: limits and
        overload are RateLimited (with the wait the headers give), 5xx transient, the rest
        permanent with the provider's message."""
        ...

    def budget_spent(self, resp: http.Response) -> float | None:
        """Seconds until the budget resets when the headers say it is spent, else ``None``."""
        ...


def _string(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **more}


def _tool_call_schema() -> dict[str, Any]:
    return object_schema(
        {
            "id": _string("The call's id, as the chat result gave it.", minLength=1),
            "name": _string("The tool's name.", pattern=NAME_PATTERN),
            "arguments": {
                "type": ["object", "string"],
                "description": "The arguments: a JSON object (or the model's text when it was not JSON).",
            },
        },
        ["id", "name", "arguments"],
    )


def _message_schema() -> dict[str, Any]:
    schema = object_schema(
        {
            "role": {
                "type": "string",
                "enum": ["system", "user", "assistant", "tool"],
                "description": "Who speaks: instructions (system), the user, the model (assistant), "
                "or a tool's result (tool).",
            },
            "content": _string("The text; for a tool message, the tool's result."),
            "tool_calls": {
                "type": "array",
                "items": _tool_call_schema(),
                "minItems": 1,
                "description": "assistant only: the tool calls the model made (from the chat result).",
            },
            "tool_call_id": _string("tool only: the id of the call this is the result of.", minLength=1),
            "is_error": {
                "type": "boolean",
                "default": False,
                "description": "tool only: the result is an error (Anthropic says so to the model).",
            },
        },
        ["role"],
    )
    schema["allOf"] = [
        {
            "if": {"properties": {"role": {"const": "tool"}}},
            "then": {"required": ["tool_call_id", "content"]},
        },
        {"if": {"properties": {"role": {"enum": ["system", "user"]}}}, "then": {"required": ["content"]}},
        {
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {"anyOf": [{"required": ["content"]}, {"required": ["tool_calls"]}]},
        },
    ]
    return schema


def _tool_schema() -> dict[str, Any]:
    return object_schema(
        {
            "name": _string("The tool's name (letters, digits, _ and -).", pattern=NAME_PATTERN),
            "description": _string("What the tool does and when to use it."),
            "parameters": {
                "type": "object",
                "description": "The JSON Schema of the tool's arguments (an object schema).",
                "properties": {"type": {"const": "object"}},
                "required": ["type"],
                "default": {"type": "object", "properties": {}},
            },
        },
        ["name"],
    )


class ChatOperation(Operation):
    """``chat``: one turn of a conversation. Built in, from the service's protocol and models."""

    description: str = (
        "Chat with the model: send the conversation, get its answer (text and tool calls), why it "
        "stopped, which model answered and the tokens used."
    )
    protocol: ProtocolName
    models: tuple[str, ...] = Field(min_length=1)
    #: Models a call may name in ``model`` besides :attr:`models`.
    allowed_models: tuple[str, ...] = ()
    default_max_tokens: int = Field(ge=1)

    def build_parameters(self) -> dict[str, Any]:
        choices = list(dict.fromkeys([*self.models, *self.allowed_models]))
        fallback = f", falling back to {', '.join(self.models[1:])} when it is overloaded or rate-limited"
        props: dict[str, dict[str, Any]] = {
            "messages": {
                "type": "array",
                "items": _message_schema(),
                "minItems": 1,
                "description": "The conversation so far, oldest first.",
            },
            "system": _string("Instructions for the model (a system prompt)."),
            "tools": {
                "type": "array",
                "items": _tool_schema(),
                "description": "Functions the model may call; a call comes back in tool_calls.",
            },
            "tool_choice": {
                "anyOf": [
                    {"type": "string", "enum": ["auto", "none", "required"]},
                    object_schema(
                        {"name": _string("The tool that must be called.", pattern=NAME_PATTERN)}, ["name"]
                    ),
                ],
                "description": "auto (the model decides), none, required (some tool), or {name} (that tool).",
            },
            "response_format": object_schema(
                {
                    "schema": {
                        "type": "object",
                        "description": "The JSON Schema the answer follows (an object schema).",
                        "properties": {"type": {"const": "object"}},
                        "required": ["type"],
                    },
                    "name": _string("A name for the format.", pattern=NAME_PATTERN, default="response"),
                    "description": _string("What the answer is."),
                    "strict": {
                        "type": "boolean",
                        "default": False,
                        "description": "OpenAI's strict mode: the schema is followed exactly (it must "
                        "then list every property as required and set additionalProperties: false).",
                    },
                },
                ["schema"],
                "Answer with JSON following a schema: the text is that JSON.",
            ),
            "max_tokens": {
                "type": "integer",
                "minimum": 1,
                "default": self.default_max_tokens,
                "description": "The most tokens the answer may have.",
            },
            "temperature": {
                "type": "number",
                "minimum": 0,
                "maximum": 1 if self.protocol == "anthropic" else 2,
                "description": "Randomness: 0 is the most deterministic.",
            },
            "model": {
                "type": "string",
                "enum": choices,
                "description": f"The model, alone (no fallback). Default: {self.models[0]}"
                + (fallback if len(self.models) > 1 else "")
                + ".",
            },
        }
        return object_schema(props, ["messages"], self.description)

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        for i, m in enumerate(clean["messages"]):
            for only, role in (("tool_calls", "assistant"), ("tool_call_id", "tool"), ("is_error", "tool")):
                if only in m and m["role"] != role:
                    raise InvalidParams(f"messages.{i}.{only}: only in a message of role {role}")
            for j, call in enumerate(m.get("tool_calls", ())):
                args = call["arguments"]
                parsed = parse_arguments(args) if isinstance(args, str) else args
                if self.protocol == "anthropic" and not isinstance(parsed, dict):  # it takes objects only
                    raise InvalidParams(f"messages.{i}.tool_calls.{j}.arguments: must be a JSON object")
        names = [t["name"] for t in clean.get("tools", ())]
        if len(set(names)) != len(names):
            raise InvalidParams("tools: two tools have the same name")
        for i, tool in enumerate(clean.get("tools", ())):
            _check_schema(tool.get("parameters"), f"tools.{i}.parameters")
        choice = clean.get("tool_choice")
        if choice == "required" and not names:
            raise InvalidParams("tool_choice: required needs tools")
        if isinstance(choice, dict) and choice["name"] not in names:
            raise InvalidParams("tool_choice.name: not the name of one of the tools")
        fmt = clean.get("response_format")
        if fmt is not None:
            _check_schema(fmt["schema"], "response_format.schema")
            if fmt.get("name", "response") in names:
                raise InvalidParams("response_format.name: a tool has that name")
        return clean


def _check_schema(schema: Any, where: str) -> None:
    if schema is None:
        return
    try:
        check_schema(schema)
    except ValueError as e:
        raise InvalidParams(f"{where}: {e}") from None


def parse_arguments(text: str) -> Any:
    """A tool call's arguments parsed; the text itself when it is not JSON (models slip)."""
    try:
        return jsonlimits.loads(text) if text.strip() else {}
    except ValueError:  # TooDeep included
        return text


def estimate_tokens(params: dict[str, Any], default_max_tokens: int) -> int:
    """What a call may cost before it is made: a quarter of the request's UTF-8 bytes (about a
    token each in English; CJK text comes closer in bytes than in characters), plus the most
    the answer may take. Settled with the provider's usage after the call."""
    sent = [params.get("system"), params["messages"], params.get("tools"), params.get("response_format")]
    size = len(json.dumps(sent, ensure_ascii=False, separators=(",", ":")).encode())
    return math.ceil(size / 4) + int(params.get("max_tokens", default_max_tokens))


def bounded(text: str, limit: int = MESSAGE_MAX) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_for(
    status: int,
    what: str,
    wait: float | None,
    retry_after_max: float,
    *,
    limited: bool,
    overloaded: bool,
    spent: bool,
) -> CallError:
    """The error of a non-2xx answer, the same rules for every protocol: a spent quota or spend
    limit is permanent (waiting will not help); a rate limit or an overloaded model is
    :class:`RateLimited` with the provider's wait (capped); 408, 409 and 5xx are transient (what
    the providers' own SDKs retry); every other status is permanent."""
    if spent:
        return PermanentError(what, status_code=status)
    if limited or overloaded:
        delay = None if wait is None else min(max(wait, 0.0), retry_after_max)
        return RateLimited(what, status_code=status, retry_after=delay)
    if status in (408, 409) or status >= 500:
        return TransientError(what, status_code=status)
    return PermanentError(what, status_code=status)


def longest(waits: Iterable[float | None]) -> float | None:
    known = [w for w in waits if w is not None]
    return max(known) if known else None


def error_text(model: str, status: int, kind: str | None, message: str | None) -> str:
    """``model: HTTP 429 rate_limit_error: <the provider's message, bounded, redacted>``."""
    head = f"{model}: HTTP {status}" + (f" {kind}" if kind else "")
    return head + (f": {bounded(redact.redact(message))}" if message else "")
