"""Anthropic's Messages API: ``POST {base_url}/v1/messages`` with ``x-api-key`` (the ``api_key``
auth, whose default header name is the same one) and ``anthropic-version``.

Request and answer: https://docs.anthropic.com/en/api/messages
Errors (529 ``overloaded_error``, 429 ``rate_limit_error``): https://docs.anthropic.com/en/api/errors
Rate-limit headers (``retry-after``; ``anthropic-ratelimit-*-reset`` in RFC 3339):
https://docs.anthropic.com/en/api/rate-limits#response-headers

The API has no response format of its own that every model takes; a JSON answer is asked for
the way Anthropic's tool-use guide shows: the schema becomes a tool the model must call, and its
input is the answer (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from integrations import http
from integrations.errors import CallError, PermanentError
from integrations.services.llm_chat import (
    ChatResult,
    FinishReason,
    ToolCall,
    error_for,
    error_text,
    longest,
    parse_arguments,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: The limits whose headers say when they reset.
LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")
EMPTY_SCHEMA = {"type": "object", "properties": {}}


class AnthropicWire:
    chat_path = "/v1/messages"
    models_path = "/v1/models"

    def __init__(self, version: str = DEFAULT_VERSION) -> None:
        self.version = version

    def headers(self) -> dict[str, str]:
        return {"anthropic-version": self.version, "Accept": "application/json"}

    def body(self, params: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
        system = [params["system"]] if "system" in params else []
        turns: list[dict[str, Any]] = []
        for m in params["messages"]:
            if m["role"] == "system":
                system.append(m["content"])
                continue
            role, blocks = _turn(m)
            # Consecutive turns of one role are one turn: the results of parallel tool calls
            # must all be in the user turn that follows them.
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += blocks
            else:
                turns.append({"role": role, "content": blocks})
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": turns}
        if system:
            body["system"] = "\n\n".join(system)
        if "temperature" in params:
            body["temperature"] = params["temperature"]
        tools = [
            {
                "name": t["name"],
                **({"description": t["description"]} if "description" in t else {}),
                "input_schema": t.get("parameters", EMPTY_SCHEMA),
            }
            for t in params.get("tools") or []
        ]
        given = params.get("tool_choice")
        choice = _choice(given) if tools and given is not None else None
        fmt = params.get("response_format")
        if fmt is not None:
            name, own_tools = fmt.get("name", "response"), bool(tools)
            tools.append(
                {
                    "name": name,
                    "description": fmt.get("description", "Give your answer: its input is the answer."),
                    "input_schema": fmt["schema"],
                }
            )
            if not own_tools or given == "none":
                choice = {"type": "tool", "name": name}  # answer through it, and only through it
            elif given in (None, "auto"):
                choice = {"type": "any"}  # a tool, or the answer: not plain text
        if tools:
            body["tools"] = tools
        if choice is not None:
            body["tool_choice"] = choice
        return body

    def result(self, data: Any, params: dict[str, Any], model: str) -> ChatResult:
        answer_tool = (params.get("response_format") or {}).get("name", "response")
        texts: list[str] = []
        calls: list[ToolCall] = []
        answered = False
        try:
            for block in data["content"]:
                if block.get("type") == "text":
                    texts.append(str(block.get("text") or ""))
                elif block.get("type") == "tool_use":
                    if "response_format" in params and block["name"] == answer_tool:
                        texts, answered = [json.dumps(block.get("input"), ensure_ascii=False)], True
                    else:
                        calls.append(
                            ToolCall(id=str(block["id"]), name=str(block["name"]), arguments=block["input"])
                        )
        except (KeyError, TypeError, AttributeError):
            raise PermanentError(f"{model}: the answer is not a message (no content blocks)") from None
        raw = data.get("stop_reason")
        finish = FINISH.get(str(raw), "other")
        if answered and not calls and finish == "tool_calls":
            finish = "stop"  # the answer came through its tool: to the caller, a plain answer
        usage = data.get("usage")
        return ChatResult(
            text="".join(texts) if not answered else texts[0],
            tool_calls=calls,
            finish_reason=finish,
            stop_reason=None if raw is None else str(raw),
            model=str(data.get("model") or model),
            usage=_usage(usage) if isinstance(usage, dict) else None,
        )

    def error(self, resp: http.Response, model: str, retry_after_max: float) -> CallError | None:
        status = resp.status_code
        if 200 <= status < 300:
            return None
        data = resp.data()
        found = data.get("error") if isinstance(data, dict) else None
        err: dict[str, Any] = found if isinstance(found, dict) else {}
        kind, message = err.get("type"), err.get("message")
        details = err.get("details")
        details = details if isinstance(details, dict) else {}
        return error_for(
            status,
            error_text(model, status, str(kind) if kind else None, str(message) if message else None),
            _wait(resp.headers),
            retry_after_max,
            limited=status == 429,
            overloaded=status in (503, 529) or kind == "overloaded_error",
            # A monthly spend limit: retrying fails until the next month or a higher tier.
            spent=status == 429 and details.get("error_code") == "enforced_spend_limit_reached",
        )

    def budget_spent(self, resp: http.Response) -> float | None:
        h = resp.headers
        return longest(
            _until(h.get(f"anthropic-ratelimit-{what}-reset"))
            for what in LIMITS
            if h.get(f"anthropic-ratelimit-{what}-remaining", "").strip() == "0"
        )


def _turn(m: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    if m["role"] == "tool":
        block = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
        if m.get("is_error"):
            block["is_error"] = True
        return "user", [block]
    blocks: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}] if m.get("content") else []
    for c in m.get("tool_calls") or []:
        args = parse_arguments(c["arguments"]) if isinstance(c["arguments"], str) else c["arguments"]
        blocks.append({"type": "tool_use", "id": c["id"], "name": c["name"], "input": args})
    if not blocks:  # a user turn of empty text: the API says so, not us
        blocks = [{"type": "text", "text": m.get("content", "")}]
    return m["role"], blocks


def _choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, dict):
        return {"type": "tool", "name": choice["name"]}
    return {"type": {"auto": "auto", "none": "none", "required": "any"}[choice]}


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    # Prompt caching counts the cached part apart; all of it is input the limits count.
    parts = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return {
        "input_tokens": sum(int(usage.get(p) or 0) for p in parts),
        "output_tokens": int(usage.get("output_tokens") or 0),
    }


def _wait(headers: dict[str, str]) -> float | None:
    """``retry-after`` (Anthropic sends it with every 429), else the reset of the spent limit."""
    after = http.parse_retry_after(headers.get("retry-after"))
    if after is not None:
        return after
    return longest(
        _until(headers.get(f"anthropic-ratelimit-{what}-reset"))
        for what in LIMITS
        if headers.get(f"anthropic-ratelimit-{what}-remaining", "").strip() == "0"
    )


def _until(value: str | None) -> float | None:
    """Seconds until an RFC 3339 time; ``None`` when it is not one."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
