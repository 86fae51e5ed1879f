"""An OpenAI-compatible and an Anthropic-compatible chat endpoint on loopback, for the llm kind.

- ``POST /v1/chat/completions`` as https://platform.openai.com/docs/api-reference/chat/create
  describes it (bearer token), answering chat completion objects shaped as there;
- ``POST /v1/messages`` as https://docs.anthropic.com/en/api/messages describes it (``x-api-key``
  and ``anthropic-version``), answering message objects shaped as there;
- ``GET /v1/models`` for both (https://platform.openai.com/docs/api-reference/models/list,
  https://docs.anthropic.com/en/api/models-list).

Each request's shape is checked against those references; a request that breaks them is answered
400 ``invalid_request_error`` naming the problem (and recorded), so a test sees it. Tokens are
words: the input counts the words of every text sent, the output the words answered. A test
plans answers per key (``[key]`` in the first user message) and model: errors with the bodies of
https://platform.openai.com/docs/guides/error-codes and https://docs.anthropic.com/en/api/errors,
or a tool call. Unplanned requests get a text answer (or, when a JSON answer is asked for, JSON
following its schema).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OPENAI, ANTHROPIC = "openai", "anthropic"
KEY = re.compile(r"\[(k[0-9a-f]+)\]")
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class Answer:
    """What to answer: an error (``status`` not 200, the provider's error ``kind``), a tool call
    (``tool``, ``arguments``), or the default text."""

    status: int = 200
    kind: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None  # OpenAI's error code (insufficient_quota, rate_limit_exceeded)
    details: dict[str, Any] | None = None  # Anthropic's error details
    tool: str | None = None
    arguments: dict[str, Any] | None = None


@dataclass
class Hit:
    at: float
    protocol: str
    path: str
    headers: dict[str, str]
    body: Any
    key: str | None
    model: str | None
    status: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    problems: list[str] = field(default_factory=list)


def words(text: Any) -> int:
    return len(str(text).split()) if text else 0


class LlmServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, token: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.token = token
        self.lock = threading.Lock()
        self.plans: dict[tuple[str, str], deque[Answer]] = defaultdict(deque)
        self.hits: list[Hit] = []

    def plan(self, key: str, model: str, *answers: Answer) -> None:
        with self.lock:
            self.plans[(key, model)].extend(answers)

    def hits_for(self, key: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.key == key]

    def next_answer(self, key: str | None, model: str | None) -> Answer:
        with self.lock:
            queue = self.plans.get((key or "", model or ""))
            return queue.popleft() if queue else Answer()

    def start(self) -> LlmServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    server: LlmServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        protocol = ANTHROPIC if "anthropic-version" in self.headers else OPENAI
        hit = self._hit(protocol, None)
        if self.path != "/v1/models":
            return self._error(hit, 404, "not_found_error", "Not Found")
        if not self._authorised(hit):
            return None
        data = [{"id": m, "object": "model"} for m in ("gpt-test", "claude-test")]
        return self._send(
            hit, 200, {"object": "list", "data": data} if protocol == OPENAI else {"data": data}
        )

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        protocol = {"/v1/chat/completions": OPENAI, "/v1/messages": ANTHROPIC}.get(self.path)
        if protocol is None:
            return self._error(self._hit(OPENAI, body), 404, "not_found_error", "Not Found")
        hit = self._hit(protocol, body)
        if not self._authorised(hit):
            return None
        hit.problems = (openai_problems if protocol == OPENAI else anthropic_problems)(body, hit.headers)
        if hit.problems:
            return self._error(hit, 400, "invalid_request_error", "; ".join(hit.problems))
        hit.input_tokens = count_input(protocol, body)
        answer = self.server.next_answer(hit.key, hit.model)
        if answer.status != 200:
            return self._error(hit, answer.status, answer.kind, answer.message, answer)
        return self._send(
            hit,
            200,
            (openai_answer if protocol == OPENAI else anthropic_answer)(body, answer, hit),
            answer.headers,
        )

    # ---- helpers -----------------------------------------------------------------------------

    def _hit(self, protocol: str, body: Any) -> Hit:
        text = json.dumps(body) if body is not None else ""
        found = KEY.search(text)
        model = body.get("model") if isinstance(body, dict) else None
        hit = Hit(
            time.time(),
            protocol,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            body,
            found.group(1) if found else None,
            model if isinstance(model, str) else None,
        )
        with self.server.lock:
            self.server.hits.append(hit)
        return hit

    def _authorised(self, hit: Hit) -> bool:
        if hit.protocol == OPENAI:
            if hit.headers.get("authorization") == f"Bearer {self.server.token}":
                return True
            # https://platform.openai.com/docs/guides/error-codes#api-errors (401 Invalid Authentication)
            self._error(
                hit,
                401,
                "invalid_request_error",
                "Incorrect API key provided: sk-****. You can "
                "find your API key at https://platform.openai.com/account/api-keys.",
                Answer(code="invalid_api_key"),
            )
            return False
        if hit.headers.get("x-api-key") == self.server.token and hit.headers.get("anthropic-version"):
            return True
        self._error(hit, 401, "authentication_error", "invalid x-api-key")
        return False

    def _error(self, hit: Hit, status: int, kind: str, message: str, answer: Answer | None = None) -> None:
        if hit.protocol == OPENAI:
            # {"error": {"message", "type", "param", "code"}} as the OpenAI API sends it.
            body: dict[str, Any] = {
                "error": {
                    "message": message,
                    "type": kind,
                    "param": None,
                    "code": answer.code if answer else None,
                }
            }
        else:
            # https://docs.anthropic.com/en/api/errors#error-shapes
            error: dict[str, Any] = {"type": kind, "message": message}
            if answer is not None and answer.details:
                error["details"] = answer.details
            body = {"type": "error", "error": error, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}
        self._send(hit, status, body, answer.headers if answer else {})

    def _send(self, hit: Hit, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        hit.status = status
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id" if hit.protocol == OPENAI else "request-id", "req_test")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


# ---- answers ---------------------------------------------------------------------------------


def instance(schema: dict[str, Any]) -> dict[str, Any]:
    """An object following a (simple) object schema: strings "ok", numbers 1, booleans true."""
    fill = {"string": "ok", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    props = schema.get("properties") or {}
    return {k: fill.get(str(props[k].get("type")), "ok") for k in schema.get("required") or props}


def _reply_text(body: dict[str, Any], max_tokens: int) -> str:
    said = ""
    for m in body["messages"]:
        if m["role"] == "user":
            content = m["content"]
            said = (
                content
                if isinstance(content, str)
                else " ".join(
                    str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
                )
                or said
            )
    return " ".join(("You said: " + KEY.sub("", said)).split()[:max_tokens])


def openai_answer(body: dict[str, Any], answer: Answer, hit: Hit) -> dict[str, Any]:
    """A chat completion object (https://platform.openai.com/docs/api-reference/chat/object)."""
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    if answer.tool:
        args = json.dumps(answer.arguments or {})
        message["tool_calls"] = [
            {"id": "call_abc123", "type": "function", "function": {"name": answer.tool, "arguments": args}}
        ]
        finish, hit.output_tokens = "tool_calls", words(args)
    else:
        fmt = body.get("response_format")
        text = (
            json.dumps(instance(fmt["json_schema"]["schema"]))
            if fmt and fmt["type"] == "json_schema"
            else _reply_text(body, max_tokens)
        )
        message["content"], finish, hit.output_tokens = text, "stop", words(text)
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1677652288,
        "model": body["model"],
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": hit.input_tokens,
            "completion_tokens": hit.output_tokens,
            "total_tokens": hit.input_tokens + hit.output_tokens,
        },
    }


def anthropic_answer(body: dict[str, Any], answer: Answer, hit: Hit) -> dict[str, Any]:
    """A message object (https://docs.anthropic.com/en/api/messages#response)."""
    choice = body.get("tool_choice") or {}
    forced = next(
        (t for t in body.get("tools", []) if choice.get("type") == "tool" and t["name"] == choice["name"]),
        None,
    )
    if answer.tool or forced is not None:
        name = answer.tool or forced["name"]  # type: ignore[index]
        args = answer.arguments if answer.tool else instance(forced["input_schema"])  # type: ignore[index]
        content = [{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": name, "input": args}]
        stop, hit.output_tokens = "tool_use", words(json.dumps(args))
    else:
        text = _reply_text(body, body["max_tokens"])
        content, stop, hit.output_tokens = [{"type": "text", "text": text}], "end_turn", words(text)
    return {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": hit.input_tokens, "output_tokens": hit.output_tokens},
    }


def count_input(protocol: str, body: dict[str, Any]) -> int:
    total = words(body.get("system")) if isinstance(body.get("system"), str) else 0
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, str):
            total += words(content)
        for b in content if isinstance(content, list) else []:
            total += words(b.get("text") or b.get("content") or json.dumps(b.get("input") or ""))
        for c in m.get("tool_calls") or []:
            total += words(c["function"]["arguments"])
    return total


# ---- the request shapes of the references ------------------------------------------------------

OPENAI_KEYS = {
    "model",
    "messages",
    "max_completion_tokens",
    "max_tokens",
    "temperature",
    "tools",
    "tool_choice",
    "response_format",
    "stop",
    "top_p",
    "n",
    "seed",
    "user",
    "stream",
    "metadata",
    "store",
}
ANTHROPIC_KEYS = {
    "model",
    "messages",
    "max_tokens",
    "system",
    "temperature",
    "tools",
    "tool_choice",
    "metadata",
    "stop_sequences",
    "stream",
    "top_k",
    "top_p",
    "thinking",
    "service_tier",
}


def openai_problems(body: Any, headers: dict[str, str]) -> list[str]:
    """What breaks https://platform.openai.com/docs/api-reference/chat/create in a request."""
    if not isinstance(body, dict):
        return ["the body must be a JSON object"]
    p = [f"Unrecognized request argument supplied: {k}" for k in body if k not in OPENAI_KEYS]
    if "json" not in headers.get("content-type", ""):
        p.append("Content-Type must be application/json")
    if not isinstance(body.get("model"), str):
        p.append("model: required string")
    if "max_tokens" in body and "max_completion_tokens" in body:
        p.append("max_tokens and max_completion_tokens: give one")
    for k in ("max_tokens", "max_completion_tokens"):
        if k in body and not (isinstance(body[k], int) and body[k] >= 1):
            p.append(f"{k}: integer >= 1")
    if "temperature" in body and not (
        isinstance(body["temperature"], int | float) and 0 <= body["temperature"] <= 2
    ):
        p.append("temperature: number between 0 and 2")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return [*p, "messages: a non-empty array"]
    called: set[str] = set()
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            p.append(f"messages[{i}].role: invalid")
        elif role == "tool":
            if m.get("tool_call_id") not in called:
                p.append(
                    f"messages[{i}]: messages with role 'tool' must be a response to a preceding message "
                    "with 'tool_calls'"
                )
            if not isinstance(m.get("content"), str):
                p.append(f"messages[{i}].content: string")
        elif role == "assistant" and m.get("tool_calls"):
            for c in m["tool_calls"]:
                if c.get("type") != "function" or not isinstance(c.get("function", {}).get("arguments"), str):
                    p.append(
                        f"messages[{i}].tool_calls: {{id, type: function, function: {{name, arguments}}}}"
                    )
                called.add(c.get("id"))
        elif not isinstance(m.get("content"), str | list):
            p.append(f"messages[{i}].content: required")
    tools = body.get("tools")
    names = []
    for t in tools or []:
        fn = t.get("function") or {}
        names.append(fn.get("name"))
        if (
            t.get("type") != "function"
            or not NAME.match(str(fn.get("name")))
            or not isinstance(fn.get("parameters", {}), dict)
        ):
            p.append("tools: [{type: function, function: {name, description, parameters}}]")
    choice = body.get("tool_choice")
    if choice is not None:
        if not tools:
            p.append("tool_choice: only allowed when tools are specified")
        elif not (
            choice in ("none", "auto", "required")
            or (
                isinstance(choice, dict)
                and choice.get("type") == "function"
                and choice.get("function", {}).get("name") in names
            )
        ):
            p.append("tool_choice: none, auto, required or {type: function, function: {name}}")
    fmt = body.get("response_format")
    if fmt is not None and not (
        fmt.get("type") == "json_schema"
        and NAME.match(str(fmt.get("json_schema", {}).get("name")))
        and isinstance(fmt["json_schema"].get("schema"), dict)
    ):
        p.append("response_format: {type: json_schema, json_schema: {name, schema, strict}}")
    return p


def anthropic_problems(body: Any, headers: dict[str, str]) -> list[str]:
    """What breaks https://docs.anthropic.com/en/api/messages in a request."""
    if not isinstance(body, dict):
        return ["the body must be a JSON object"]
    p = [f"{k}: Extra inputs are not permitted" for k in body if k not in ANTHROPIC_KEYS]
    if "json" not in headers.get("content-type", ""):
        p.append("content-type must be application/json")
    if not isinstance(body.get("model"), str):
        p.append("model: Field required")
    if not (isinstance(body.get("max_tokens"), int) and body["max_tokens"] >= 1):
        p.append("max_tokens: Field required (integer >= 1)")
    if "temperature" in body and not (
        isinstance(body["temperature"], int | float) and 0 <= body["temperature"] <= 1
    ):
        p.append("temperature: number between 0 and 1")
    if "system" in body and not isinstance(body["system"], str | list):
        p.append("system: string or text blocks")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return [*p, "messages: Field required (a non-empty array)"]
    used: set[str] = set()
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            p.append(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            p.append(f"messages.{i}.content: a string or a non-empty list of blocks")
            continue
        results_done = False
        for j, b in enumerate(blocks):
            kind = b.get("type")
            if kind == "text":
                results_done = True
                if not (isinstance(b.get("text"), str) and b["text"]):
                    p.append(f"messages.{i}.content.{j}: text content blocks must be non-empty")
            elif kind == "tool_use" and role == "assistant":
                if not (
                    isinstance(b.get("id"), str)
                    and NAME.match(str(b.get("name")))
                    and isinstance(b.get("input"), dict)
                ):
                    p.append(f"messages.{i}.content.{j}: tool_use {{id, name, input: object}}")
                used.add(b.get("id"))
            elif kind == "tool_result" and role == "user":
                if b.get("tool_use_id") not in used:
                    p.append(
                        f"messages.{i}.content.{j}: tool_result block(s) provided without a matching tool_use"
                    )
                if results_done:
                    p.append(f"messages.{i}.content.{j}: tool_result blocks must come first")
                if not isinstance(b.get("content", ""), str | list) or not isinstance(
                    b.get("is_error", False), bool
                ):
                    p.append(f"messages.{i}.content.{j}: tool_result {{tool_use_id, content, is_error}}")
            else:
                p.append(f"messages.{i}.content.{j}: unexpected block {kind} in a {role} message")
    tools = body.get("tools")
    names = []
    for t in tools or []:
        names.append(t.get("name"))
        schema = t.get("input_schema")
        if not NAME.match(str(t.get("name"))) or not (
            isinstance(schema, dict) and schema.get("type") == "object"
        ):
            p.append("tools: [{name, description, input_schema: {type: object}}]")
    choice = body.get("tool_choice")
    if choice is not None:
        if not tools:
            p.append("tool_choice: may only be specified while providing tools")
        elif choice.get("type") not in ("auto", "any", "tool", "none") or (
            choice["type"] == "tool" and choice.get("name") not in names
        ):
            p.append("tool_choice: {type: auto | any | none} or {type: tool, name}")
    return p
