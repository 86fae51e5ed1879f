"""Operations as LLM tools: definitions in every format, strict mode, per-agent tool sets, and a
model's tool calls run as jobs through a real worker against the loopback stub."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator
from procs import cli
from stub import Reply, Stub

from integrations.config import Settings
from integrations.errors import ConfigError
from integrations.services import load_services
from integrations.tools import FORMATS, definitions, tool_name
from integrations.tools.agents import load_agents
from integrations.tools.calls import drop_nulls
from integrations.tools.definitions import NAME
from tasks.tools import run

ECHO = "tools_stub__echo"
CREATE = "tools_stub__create"


def schema_of(tool: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "openai":
        return dict(tool["function"]["parameters"])
    return dict(tool["input_schema"] if fmt == "anthropic" else tool["inputSchema"] if fmt == "mcp" else tool)


def name_of(tool: dict[str, Any], fmt: str) -> str:
    return str(
        tool["function"]["name"]
        if fmt == "openai"
        else tool["title"]
        if fmt == "json-schema"
        else tool["name"]
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("strict", [False, True])
def test_every_tool_is_valid_json_schema_2020_12_with_a_valid_unique_name(fmt: str, strict: bool) -> None:
    tools = definitions(fmt, strict=strict)  # type: ignore[arg-type]
    assert len(tools) >= 19
    names = [name_of(t, fmt) for t in tools]
    assert len(set(names)) == len(names)
    for tool, name in zip(tools, names, strict=True):
        assert NAME.fullmatch(name), name
        Draft202012Validator.check_schema(schema_of(tool, fmt))
        assert schema_of(tool, fmt)["type"] == "object"


def test_each_provider_gets_its_own_shape() -> None:
    (openai,) = [t for t in definitions("openai", services=["tools_stub"]) if t["function"]["name"] == ECHO]
    assert openai["type"] == "function" and set(openai["function"]) == {"name", "description", "parameters"}
    description = openai["function"]["description"]
    assert (
        description.startswith("Echo the request back.")
        and "The loopback stub, as an agent's tools." in description
    )
    params = openai["function"]["parameters"]
    assert params["required"] == ["key"] and params["additionalProperties"] is False
    assert params["properties"]["q"] == {"type": "string", "description": "a word to echo"}
    assert params["properties"]["n"] == {"type": "integer", "minimum": 0}
    anthropic = definitions("anthropic", services=["tools_stub"])[0]
    assert set(anthropic) == {"name", "description", "input_schema"} and anthropic["input_schema"] == params
    mcp = definitions("mcp", services=["tools_stub"])[0]
    assert set(mcp) == {"name", "description", "inputSchema"} and mcp["inputSchema"] == params
    plain = definitions("json-schema", services=["tools_stub"])[0]
    assert plain["$schema"] == "https://json-schema.org/draft/2020-12/schema" and plain["title"] == ECHO


def test_names_are_service__operation_or_made_valid_stably() -> None:
    assert tool_name("github", "create_issue") == "github__create_issue"
    odd = tool_name("github", "create issue/v2")
    assert NAME.fullmatch(odd) and odd == tool_name("github", "create issue/v2")
    assert odd.startswith("github__create_issue_v2_") and odd != tool_name("github", "create issue.v2")
    long = tool_name("s" * 60, "operation")
    assert len(long) == 64 and NAME.fullmatch(long) and long != tool_name("s" * 60, "operation2")


def test_strict_mode_requires_every_property_and_makes_optional_ones_nullable() -> None:
    tools = {
        t["function"]["name"]: t["function"]
        for t in definitions("openai", ["tools_stub", "tools_rest"], strict=True)
    }
    echo = tools[ECHO]
    assert echo["strict"] is True
    p = echo["parameters"]
    assert p["required"] == ["key", "q", "n"] and p["additionalProperties"] is False
    assert p["properties"]["q"]["type"] == ["string", "null"]
    assert (
        p["properties"]["key"]["type"] == "string" and "minLength: 1" in p["properties"]["key"]["description"]
    )
    body = tools[CREATE]["parameters"]["properties"]["body"]
    assert body["required"] == ["title", "tags"] and body["additionalProperties"] is False
    assert body["properties"]["tags"]["type"] == ["array", "null"]
    title = body["properties"]["title"]
    assert "minLength" not in title and title["description"] == "(minLength: 1)"  # stated, not enforced
    # An array of anything has no strict form: that tool is offered without strict.
    form = tools["tools_rest__form"]
    assert "strict" not in form and form["parameters"]["properties"]["tags"] == {"type": "array"}


def test_a_strict_call_with_nulls_validates_against_the_full_schema() -> None:
    from integrations.jobs import resolve

    _, op = resolve("tools_stub", "create")
    sent = {"key": "k", "body": {"title": "t", "tags": None}}
    assert op.validate_params(drop_nulls(sent, op.parameters)) == {"key": "k", "body": {"title": "t"}}


def test_agents_see_only_their_tools() -> None:
    assert [t["name"] for t in definitions("anthropic", agent="helper")] == [ECHO]
    assert [t["name"] for t in definitions("anthropic", agent="writer")] == [ECHO, CREATE]
    assert definitions("anthropic", agent="stranger") == []
    assert len(definitions("anthropic")) >= 19


def test_an_agent_naming_an_unknown_operation_fails_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "services:\n  svc:\n    base_url: https://api.example.com\n"
        "    operations: {op: {method: GET, path: /x}}\n"
        "agents:\n  bot: {tools: {svc: [op, nope]}}\n"
    )
    with pytest.raises(ConfigError, match=r"agents\.bot\.tools\.svc: 'nope' is not one of its operations"):
        load_agents(path, load_services(path, Settings()))


def openai_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    # The shape of a tool call in a Chat Completions answer:
    # https://platform.openai.com/docs/api-reference/chat/object
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": raw}}


def anthropic_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    # A tool_use content block: https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


@pytest.mark.usefixtures("worker")
def test_a_tool_call_runs_once_as_a_job_and_answers_in_the_providers_format(stub: Stub, key: str) -> None:
    answer = run(
        openai_call(f"call_{key}", ECHO, {"key": key, "q": "hi", "n": None}), agent="helper", wait=20
    )
    assert answer["role"] == "tool" and answer["tool_call_id"] == f"call_{key}"
    out = json.loads(answer["content"])
    assert out["status"] == "succeeded" and out["data"]["query"] == {"q": ["hi"]} and out["job_id"]
    again = run(openai_call(f"call_{key}", ECHO, {"key": key, "q": "hi"}), agent="helper", wait=20)
    assert json.loads(again["content"])["job_id"] == out["job_id"]  # the same call is the same job
    block = run(
        anthropic_call(f"toolu_{key}", CREATE, {"key": key, "body": {"title": "t"}}), agent="writer", wait=20
    )
    assert (
        block["type"] == "tool_result" and block["tool_use_id"] == f"toolu_{key}" and "is_error" not in block
    )
    assert json.loads(block["content"])["data"]["json"] == {"title": "t"}
    assert len(stub.hits_for(key)) == 2


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("name", "arguments", "agent", "message"),
    [
        ("nosuch__tool", {}, None, "no tool named 'nosuch__tool' is available to this agent"),
        (
            CREATE,
            {"key": "k", "body": {"title": "t"}},
            "helper",
            "no tool named 'tools_stub__create' is available",
        ),
        (ECHO, {"key": "k"}, "stranger", "is available to this agent"),
        (ECHO, {"q": "x"}, None, "tools_stub.echo: key: required"),
        (CREATE, {"key": "k", "body": {"title": ""}}, None, "body.title: fails minLength"),
        (ECHO, "{not json", None, "arguments are not JSON"),
    ],
)
def test_refusals_and_bad_arguments_are_results_the_model_reads(
    stub: Stub, name: str, arguments: Any, agent: str | None, message: str
) -> None:
    answer = run(openai_call("call_bad", name, arguments), agent=agent, wait=5)
    assert message in json.loads(answer["content"])["error"]
    block = run(anthropic_call("toolu_bad", name, arguments), agent=agent, wait=5)
    if not isinstance(arguments, str):
        assert block["is_error"] is True and message in json.loads(block["content"])["error"]


@pytest.mark.usefixtures("worker")
def test_a_failed_or_slow_job_is_a_result_with_its_job_id(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=404), Reply(delay=1.5))
    failed = run(anthropic_call(f"toolu_f_{key}", ECHO, {"key": key}), wait=20)
    assert failed["is_error"] is True
    out = json.loads(failed["content"])
    assert out["status"] == "failed" and out["error"] == "HTTP 404 Not Found" and out["job_id"]
    slow = json.loads(run(openai_call(f"call_s_{key}", ECHO, {"key": key}), wait=0.2)["content"])
    assert slow["status"] in ("queued", "running") and "job_status" in slow["message"] and slow["job_id"]


class ScriptedModel(ThreadingHTTPServer):
    """A "model" speaking the Chat Completions protocol on loopback: its first answer calls the
    echo tool, its second answers with what the tool result said. Bodies as in
    https://platform.openai.com/docs/api-reference/chat/create and .../chat/object."""

    daemon_threads = True

    def __init__(self, key: str) -> None:
        super().__init__(("127.0.0.1", 0), _ModelHandler)
        self.key = key
        self.requests: list[dict[str, Any]] = []


class _ModelHandler(BaseHTTPRequestHandler):
    server: ScriptedModel

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append(body)
        tools = {t["function"]["name"] for t in body.get("tools", [])}
        last = body["messages"][-1]
        if self.path != "/v1/chat/completions" or ECHO not in tools:
            self._send(
                400,
                {
                    "error": {
                        "message": "expected tools with tools_stub__echo",
                        "type": "invalid_request_error",
                    }
                },
            )
            return
        if last["role"] == "user":
            arguments = json.dumps({"key": self.server.key, "q": "hello"})
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_Ul2oTy9FOEyhNSYVFSoW9PRG",
                        "type": "function",
                        "function": {"name": ECHO, "arguments": arguments},
                    }
                ],
                "refusal": None,
            }
            finish = "tool_calls"
        else:
            echoed = json.loads(last["content"])["data"]["query"]["q"][0]
            message = {"role": "assistant", "content": f"The stub echoed {echoed}.", "refusal": None}
            finish = "stop"
        self._send(
            200,
            {
                "id": f"chatcmpl-{len(self.server.requests)}",
                "object": "chat.completion",
                "created": 1741570283,
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
            },
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def model(key: str) -> Iterator[ScriptedModel]:
    server = ScriptedModel(key)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("worker")
def test_a_full_openai_tool_use_loop(model: ScriptedModel, stub: Stub, key: str) -> None:
    url = f"http://127.0.0.1:{model.server_address[1]}/v1/chat/completions"
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Echo hello through the stub."}]
    tools = definitions("openai", agent="helper", strict=True)
    for _ in range(4):  # bounded: the script ends on its second answer
        reply = requests.post(url, json={"model": "gpt-4o", "messages": messages, "tools": tools}, timeout=10)
        assert reply.status_code == 200, reply.text
        message = reply.json()["choices"][0]["message"]
        messages.append(message)
        if not message.get("tool_calls"):
            break
        messages += [run(call, agent="helper", wait=20) for call in message["tool_calls"]]
    assert messages[-1]["content"] == "The stub echoed hello."
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_call_id"] == "call_Ul2oTy9FOEyhNSYVFSoW9PRG"
    (hit,) = stub.hits_for(key)
    assert hit.query == {"q": ["hello"]}


def test_services_command_lists_the_agents() -> None:
    out = cli("services")
    assert out.returncode == 0, out.stderr
    assert "  helper: tools_stub (echo)" in out.stdout and "  writer: tools_stub (all)" in out.stdout


def test_cli_prints_the_definitions() -> None:
    out = cli("tools", "--format", "anthropic", "--agent", "helper")
    assert out.returncode == 0, out.stderr
    assert [t["name"] for t in json.loads(out.stdout)] == [ECHO]
    bad = cli("tools", "--service", "nosuch")
    assert bad.returncode == 2 and re.search(r"unknown service 'nosuch'", bad.stderr)


def test_arguments_nested_too_deeply_are_a_result_the_model_reads() -> None:
    from tasks.tools import run as run_tool

    call = {
        "id": "call_deep",
        "type": "function",
        "function": {"name": "stub__echo", "arguments": "[" * 5000},
    }
    assert json.loads(run_tool(call, wait=1)["content"]) == {"error": "arguments are not JSON"}
    deep: Any = "x"
    for _ in range(2000):
        deep = {"a": deep}
    block = {"type": "tool_use", "id": "toolu_deep", "name": "stub__echo", "input": {"key": deep}}
    result = run_tool(block, wait=1)
    assert result["is_error"] is True
    assert json.loads(result["content"]) == {"error": "the arguments are nested deeper than 32 levels"}


def test_tool_call_keys_are_unambiguous_and_follow_the_arguments() -> None:
    from integrations.tools.calls import idempotency_key

    # Joined with ':' these would spell one key, and one agent would get the other's result.
    assert idempotency_key("openai", "k8:y", "a") != idempotency_key("openai", "y", "a:k8")
    assert idempotency_key("openai", "c", "a", connection="x:y") != idempotency_key(
        "openai", "c:x", "a", connection="y"
    )
    # A model that reuses a call id for other arguments gets a new job, not the earlier result.
    assert idempotency_key("openai", "call_0", "a", {"p": 1}) != idempotency_key(
        "openai", "call_0", "a", {"p": 2}
    )
    # The nulls strict mode sends for what it leaves out are the same call.
    assert idempotency_key("openai", "c", "a", {"p": 1, "q": None}) == idempotency_key(
        "openai", "c", "a", {"p": 1}
    )
