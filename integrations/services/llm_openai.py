"""OpenAI's Chat Completions, the protocol OpenAI, OpenWebUI, vLLM, Ollama and many others speak:
``POST {base_url}/chat/completions`` with a bearer token, ``base_url`` ending in ``/v1`` as in
every OpenAI-compatible server's docs (OpenWebUI's is ``.../api``).

Request and answer: https://platform.openai.com/docs/api-reference/chat/create
Errors: https://platform.openai.com/docs/guides/error-codes
Rate-limit headers (``x-ratelimit-reset-requests: 1s``, ``...-tokens: 6m0s``):
https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

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

DEFAULT_BASE_URL = "https://api.openai.com/v1"
FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated form of the same
    "content_filter": "content_filter",
}
#: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``: Go durations, as OpenAI's reset headers give them.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
#: The error codes that say waiting will not help (the account's quota is used up).
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

MaxTokensField = Literal["max_completion_tokens", "max_tokens"]


class OpenAIWire:
    chat_path = "/chat/completions"
    models_path = "/models"

    def __init__(self, max_tokens_field: MaxTokensField = "max_completion_tokens") -> None:
        self.max_tokens_field = max_tokens_field

    def headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}

    def body(self, params: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if "system" in params:
            messages.append({"role": "system", "content": params["system"]})
        messages += [_message(m) for m in params["messages"]]
        body: dict[str, Any] = {"model": model, "messages": messages, self.max_tokens_field: max_tokens}
        if "temperature" in params:
            body["temperature"] = params["temperature"]
        tools = params.get("tools") or []
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t["name"],
                        **({"description": t["description"]} if "description" in t else {}),
                        "parameters": t.get("parameters", EMPTY_PARAMETERS),
                    },
                }
                for t in tools
            ]
            choice = params.get("tool_choice")
            if isinstance(choice, dict):
                body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
            elif choice is not None:
                body["tool_choice"] = choice
        fmt = params.get("response_format")
        if fmt is not None:
            spec = {
                "name": fmt.get("name", "response"),
                "schema": fmt["schema"],
                "strict": fmt.get("strict", False),
            }
            if "description" in fmt:
                spec["description"] = fmt["description"]
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        return body

    def result(self, data: Any, params: dict[str, Any], model: str) -> ChatResult:
        try:
            choice = data["choices"][0]
            msg = choice["message"]
            calls = [
                ToolCall(
                    id=str(c.get("id") or ""),
                    name=str(c["function"]["name"]),
                    arguments=parse_arguments(str(c["function"].get("arguments") or "")),
                )
                for c in msg.get("tool_calls") or []
                if c.get("type", "function") == "function"
            ]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise PermanentError(
                f"{model}: the answer is not a chat completion (no choices[0].message)"
            ) from None
        content = msg.get("content")
        if isinstance(content, list):  # some servers answer in parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        raw = choice.get("finish_reason")
        finish = FINISH.get(str(raw), "other")
        if msg.get("refusal"):
            finish = "content_filter"
        elif calls and finish == "stop":
            finish = "tool_calls"  # some compatible servers say stop although the model called tools
        usage = data.get("usage")
        return ChatResult(
            text=str(content or msg.get("refusal") or ""),
            tool_calls=calls,
            finish_reason=finish,
            stop_reason=None if raw is None else str(raw),
            model=str(data.get("model") or model),
            usage=(
                {
                    "input_tokens": int(usage.get("prompt_tokens") or 0),
                    "output_tokens": int(usage.get("completion_tokens") or 0),
                }
                if isinstance(usage, dict)
                else None
            ),
        )

    def error(self, resp: http.Response, model: str, retry_after_max: float) -> CallError | None:
        status = resp.status_code
        if 200 <= status < 300:
            return None
        kind, code, message = _error_object(resp.data())
        return error_for(
            status,
            error_text(model, status, code or kind, message),
            _wait(resp.headers),
            retry_after_max,
            limited=status == 429,
            overloaded=status in (503, 529),
            spent=status == 429 and code in QUOTA_CODES,
        )

    def budget_spent(self, resp: http.Response) -> float | None:
        h = resp.headers
        return longest(
            duration(h.get(f"x-ratelimit-reset-{what}"))
            for what in ("requests", "tokens")
            if h.get(f"x-ratelimit-remaining-{what}", "").strip() == "0"
        )


def _message(m: dict[str, Any]) -> dict[str, Any]:
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]}
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {
                    "name": c["name"],
                    "arguments": c["arguments"]
                    if isinstance(c["arguments"], str)
                    else json.dumps(c["arguments"]),
                },
            }
            for c in m["tool_calls"]
        ]
    return out


def _error_object(data: Any) -> tuple[str | None, str | None, str | None]:
    """``(type, code, message)`` of an error body: OpenAI's ``{"error": {...}}``, or the flat
    ``{"message", "type", "code"}`` or ``{"error": "text"}`` some compatible servers send."""
    if not isinstance(data, dict):
        return None, None, data if isinstance(data, str) else None
    err = data.get("error", data)
    if isinstance(err, str):
        return None, None, err
    if not isinstance(err, dict):
        return None, None, None

    def text(key: str) -> str | None:
        value = err.get(key)
        return str(value) if isinstance(value, str | int) and value != "" else None

    return text("type"), text("code"), text("message")


def _wait(headers: dict[str, str]) -> float | None:
    """How long a 429 asks to wait: ``retry-after-ms``, ``retry-after``, else the reset of the
    spent budget (``x-ratelimit-reset-*`` whose ``remaining`` is 0), else the longest reset."""
    ms = headers.get("retry-after-ms", "").strip()
    if ms.replace(".", "", 1).isdigit():
        return float(ms) / 1000
    after = http.parse_retry_after(headers.get("retry-after"))
    if after is not None:
        return after
    resets = {what: duration(headers.get(f"x-ratelimit-reset-{what}")) for what in ("requests", "tokens")}
    spent = [resets[w] for w in resets if headers.get(f"x-ratelimit-remaining-{w}", "").strip() == "0"]
    return longest(spent) or longest(resets.values())


def duration(value: str | None) -> float | None:
    """Seconds in a Go duration (``6m0s``, ``1.5s``, ``20ms``); ``None`` when it is not one."""
    if not value:
        return None
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)
