"""The ``llm`` kind through real workers and the ledger, against an OpenAI-compatible and an
Anthropic-compatible chat endpoint on loopback (tests/llm_server.py) that check every request's
shape against the providers' API references and count tokens as words.

Each test marks its conversation with its own key (``[key]`` in the first user message), so the
server's record and plans are its own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from conftest import TOKEN
from llm_server import Answer, Hit, LlmServer
from procs import cli
from pydantic import ValidationError
from sqlalchemy import func, select

from integrations import coordination, health
from integrations.config import Settings
from integrations.errors import ConfigError, InvalidParams, PermanentError
from integrations.ledger import jobs as ledger
from integrations.ledger import reads
from integrations.ledger.db import get_engine
from integrations.ledger.models import Job
from integrations.services import get_services, load_services
from integrations.services.llm import LlmService
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")

PRIMARY = {"llm_openai": "gpt-test", "llm_anthropic": "claude-test"}
FALLBACK = {"llm_openai": "gpt-test-mini", "llm_anthropic": "claude-test-small"}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def llm() -> Iterator[LlmServer]:
    server = LlmServer(int(os.environ["LLM_PORT"]), TOKEN).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def chat(service: str, key: str, text: str = "hello there", **params: Any) -> AsyncResult:
    messages = params.pop("messages", [{"role": "user", "content": f"[{key}] {text}"}])
    return call_service.delay(service, "chat", {"messages": messages, **params})


def job(job_id: str) -> dict[str, Any]:
    found = reads.get_job(job_id, with_attempts=True)
    assert found is not None
    return found


def served(hits: list[Hit]) -> list[tuple[str | None, int]]:
    return [(h.model, h.status) for h in hits]


def test_openai_chat_answers_text_and_the_job_keeps_the_model_and_tokens(llm: LlmServer, key: str) -> None:
    out = chat("llm_openai", key, "hello there friend", system="Be brief.").get(timeout=30)

    (hit,) = llm.hits_for(key)
    assert hit.problems == [] and hit.path == "/v1/chat/completions"
    assert hit.headers["authorization"] == f"Bearer {TOKEN}"
    assert hit.headers["idempotency-key"] == out["job_id"]
    assert hit.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"[{key}] hello there friend"},
        ],
        "max_completion_tokens": 64,  # the service's default_max_tokens
    }
    usage = {"input_tokens": hit.input_tokens, "output_tokens": hit.output_tokens}
    assert usage == {"input_tokens": 6, "output_tokens": 5}
    assert out["data"] == {
        "text": "You said: hello there friend",
        "tool_calls": [],
        "finish_reason": "stop",
        "stop_reason": "stop",
        "model": "gpt-test",
        "usage": usage,
    }
    row = job(out["job_id"])
    assert (row["input_tokens"], row["output_tokens"]) == (6, 5)
    assert row["meta"] == {"model": "gpt-test", "finish_reason": "stop", "request_id": "req_test"}
    assert TOKEN not in json.dumps(row, default=str)


def test_anthropic_chat_answers_text_with_its_headers_and_body(llm: LlmServer, key: str) -> None:
    messages = [
        {"role": "system", "content": "In English."},  # Anthropic has no system role: it joins system
        {"role": "user", "content": f"[{key}] hello there"},
    ]
    out = chat("llm_anthropic", key, messages=messages, system="Be brief.", temperature=0.5).get(timeout=30)

    (hit,) = llm.hits_for(key)
    assert hit.problems == [] and hit.path == "/v1/messages"
    assert hit.headers["x-api-key"] == TOKEN and "authorization" not in hit.headers
    assert hit.headers["anthropic-version"] == "2023-06-01"
    assert hit.body == {
        "model": "claude-test",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"[{key}] hello there"}]}],
        "system": "Be brief.\n\nIn English.",
        "temperature": 0.5,
    }
    assert out["data"]["text"] == "You said: hello there"
    assert out["data"]["finish_reason"] == "stop" and out["data"]["stop_reason"] == "end_turn"
    assert out["data"]["usage"] == {"input_tokens": 7, "output_tokens": 4}
    row = job(out["job_id"])
    assert (row["input_tokens"], row["output_tokens"], row["meta"]["model"]) == (7, 4, "claude-test")


def test_a_call_may_name_an_allowed_model_which_then_goes_alone(llm: LlmServer, key: str) -> None:
    llm.plan(key, "gpt-test-large", Answer(500, "server_error", "The server had an error."))
    out = chat("llm_openai", key, model="gpt-test-large").get(timeout=30)
    assert out["data"]["model"] == "gpt-test-large"
    assert served(llm.hits_for(key)) == [("gpt-test-large", 500), ("gpt-test-large", 200)]


@pytest.mark.parametrize("service", ["llm_openai", "llm_anthropic"])
def test_a_tool_call_comes_back_parsed_and_its_result_goes_back_in_the_protocols_shape(
    llm: LlmServer, key: str, service: str
) -> None:
    llm.plan(key, PRIMARY[service], Answer(tool="get_weather", arguments={"city": "Paris"}))
    asked = [{"role": "user", "content": f"[{key}] weather in Paris?"}]

    first = chat(service, key, messages=asked, tools=[WEATHER], tool_choice="auto").get(timeout=30)
    (call,) = first["data"]["tool_calls"]
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"} and call["id"]
    assert first["data"]["finish_reason"] == "tool_calls"
    assert first["data"]["stop_reason"] == {"llm_openai": "tool_calls", "llm_anthropic": "tool_use"}[service]

    conversation = [
        *asked,
        {"role": "assistant", "tool_calls": first["data"]["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"},
    ]
    second = chat(service, key, messages=conversation, tools=[WEATHER]).get(timeout=30)
    assert second["data"]["finish_reason"] == "stop" and second["data"]["tool_calls"] == []

    asking, answering = llm.hits_for(key)
    assert asking.problems == [] and answering.problems == []
    if service == "llm_openai":
        assert asking.body["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": WEATHER["description"],
                    "parameters": WEATHER["parameters"],
                },
            }
        ]
        assert asking.body["tool_choice"] == "auto"
        assert answering.body["messages"][1:] == [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"},
        ]
    else:
        assert asking.body["tools"] == [
            {
                "name": "get_weather",
                "description": WEATHER["description"],
                "input_schema": WEATHER["parameters"],
            }
        ]
        assert asking.body["tool_choice"] == {"type": "auto"}
        assert answering.body["messages"][1:] == [
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": call["id"], "name": "get_weather", "input": {"city": "Paris"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "18 C, sunny"}],
            },
        ]


@pytest.mark.parametrize("service", ["llm_openai", "llm_anthropic"])
def test_a_response_format_gives_json_text_following_the_schema(
    llm: LlmServer, key: str, service: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
        "required": ["city", "celsius"],
    }
    out = chat(service, key, "weather?", response_format={"name": "weather", "schema": schema}).get(
        timeout=30
    )

    assert json.loads(out["data"]["text"]) == {"city": "ok", "celsius": 1}
    assert out["data"]["finish_reason"] == "stop" and out["data"]["tool_calls"] == []
    (hit,) = llm.hits_for(key)
    assert hit.problems == []
    if service == "llm_openai":
        assert hit.body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": False},
        }
    else:  # the schema is a tool the model must call
        assert hit.body["tools"] == [
            {
                "name": "weather",
                "description": "Give your answer: its input is the answer.",
                "input_schema": schema,
            }
        ]
        assert hit.body["tool_choice"] == {"type": "tool", "name": "weather"}


PERMANENT = [
    ("llm_openai", Answer(400, "invalid_request_error", "Invalid 'messages[0].content': string too long.")),
    (
        "llm_openai",
        Answer(404, "invalid_request_error", "The model `gpt-test` does not exist.", code="model_not_found"),
    ),
    # A spent quota is a 429 that waiting does not cure.
    (
        "llm_openai",
        Answer(
            429,
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
            code="insufficient_quota",
        ),
    ),
    ("llm_anthropic", Answer(400, "invalid_request_error", "messages.0.content: Field required")),
    (
        "llm_anthropic",
        Answer(
            403, "permission_error", "Your API key does not have permission to use the specified resource."
        ),
    ),
    ("llm_anthropic", Answer(404, "not_found_error", "model: claude-test")),
    (
        "llm_anthropic",
        Answer(
            429,
            "rate_limit_error",
            "You have reached your specified API usage limits.",
            details={"error_code": "enforced_spend_limit_reached"},
        ),
    ),
]


@pytest.mark.parametrize(("service", "answer"), PERMANENT, ids=[f"{s}-{a.status}" for s, a in PERMANENT])
def test_a_client_error_fails_the_job_at_once_with_the_providers_message(
    llm: LlmServer, key: str, service: str, answer: Answer
) -> None:
    llm.plan(key, PRIMARY[service], answer)
    r = chat(service, key)
    with pytest.raises(PermanentError, match=f"HTTP {answer.status} {answer.code or answer.kind}: "):
        r.get(timeout=30)

    row = job(r.id)
    assert row["status"] == "failed" and row["attempts"] == 1
    assert answer.message[:40] in row["error"] and row["error"].startswith(PRIMARY[service] + ":")
    assert row["attempts_log"][0]["status_code"] == answer.status
    assert served(llm.hits_for(key)) == [(PRIMARY[service], answer.status)]  # no fallback for these


def test_a_wrong_key_is_permanent_and_never_stored(llm: LlmServer, key: str) -> None:
    r = chat("llm_wrong_key", key)
    with pytest.raises(PermanentError, match="HTTP 401 invalid_api_key: Incorrect API key provided"):
        r.get(timeout=30)
    assert "not-the-key" not in json.dumps(job(r.id), default=str)
    assert served(llm.hits_for(key)) == [("gpt-test", 401)]


@pytest.mark.parametrize(
    ("service", "answer"),
    [
        ("llm_openai", Answer(500, "server_error", "The server had an error while processing your request.")),
        ("llm_anthropic", Answer(500, "api_error", "Internal server error")),
    ],
)
def test_a_server_error_is_retried_on_the_same_model(
    llm: LlmServer, key: str, service: str, answer: Answer
) -> None:
    llm.plan(key, PRIMARY[service], answer)
    out = chat(service, key).get(timeout=30)

    assert out["data"]["model"] == PRIMARY[service]
    assert [a["outcome"] for a in job(out["job_id"])["attempts_log"]] == ["retrying", "succeeded"]
    assert served(llm.hits_for(key)) == [(PRIMARY[service], 500), (PRIMARY[service], 200)]


@pytest.mark.parametrize(
    ("service", "answer"),
    [
        # https://platform.openai.com/docs/guides/error-codes (429 rate limit reached for requests)
        (
            "llm_openai",
            Answer(
                429,
                "requests",
                "Rate limit reached for gpt-test in organization org-x on requests per min (RPM): Limit 3.",
                code="rate_limit_exceeded",
                headers={"retry-after": "20"},
            ),
        ),
        # https://docs.anthropic.com/en/api/errors: 529 overloaded_error
        ("llm_anthropic", Answer(529, "overloaded_error", "Overloaded", headers={"retry-after": "20"})),
    ],
)
def test_a_limited_primary_passes_the_same_attempt_to_the_fallback_model(
    llm: LlmServer, key: str, service: str, answer: Answer
) -> None:
    llm.plan(key, PRIMARY[service], answer)
    out = chat(service, key).get(timeout=30)

    assert out["data"]["model"] == FALLBACK[service]
    row = job(out["job_id"])
    assert row["attempts"] == 1 and row["meta"]["model"] == FALLBACK[service]
    assert row["meta"]["limited"] == [
        {"model": PRIMARY[service], "status_code": answer.status, "retry_after": 20.0}
    ]
    hits = llm.hits_for(key)
    assert served(hits) == [(PRIMARY[service], answer.status), (FALLBACK[service], 200)]
    assert [h.headers["idempotency-key"] for h in hits] == [out["job_id"], out["job_id"] + "-fallback-1"]
    assert coordination.paused_for(service) == 0  # a model answered: nothing to hold


@pytest.mark.parametrize(
    ("service", "plans"),
    [
        (
            "llm_paused",
            {
                "claude-test": Answer(
                    429,
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit",
                    headers={"retry-after": "1"},
                ),
                "claude-test-small": Answer(
                    529, "overloaded_error", "Overloaded", headers={"retry-after": "3"}
                ),
            },
        ),
        # No retry-after: the spent budget's reset (a Go duration) says how long.
        (
            "llm_paused_openai",
            {
                "gpt-test": Answer(
                    429,
                    "requests",
                    "Rate limit reached for gpt-test on requests per min (RPM): Limit 3.",
                    code="rate_limit_exceeded",
                    headers={
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": "3s",
                        "x-ratelimit-remaining-tokens": "9000",
                        "x-ratelimit-reset-tokens": "1s",
                    },
                )
            },
        ),
    ],
)
def test_every_model_limited_holds_every_worker_for_the_longest_wait(
    llm: LlmServer, key: str, service: str, plans: dict[str, Answer]
) -> None:
    for model, answer in plans.items():
        llm.plan(key, model, answer)
    first = chat(service, key)
    deadline = time.monotonic() + 15
    while coordination.paused_for(service) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    others = [chat(service, key) for _ in range(4)]
    for r in [first, *others]:
        assert r.get(timeout=40)["status"] == "succeeded"

    hits = llm.hits_for(key)
    limited, after = hits[: len(plans)], hits[len(plans) :]
    assert served(limited) == [(m, a.status) for m, a in plans.items()]
    assert len(after) == 5 and all(h.status == 200 for h in after)
    assert all(h.at - limited[-1].at >= 2.9 for h in after)  # the longest wait: 3 s
    attempt = job(first.id)["attempts_log"][0]
    assert attempt["outcome"] == "retrying" and attempt["status_code"] == list(plans.values())[-1].status
    if len(plans) > 1:
        assert attempt["error"].startswith("every model is rate-limited or overloaded (claude-test: HTTP 429")


def test_a_spent_budget_on_a_success_holds_the_service_until_it_resets(llm: LlmServer, key: str) -> None:
    # The only model's budget is spent (no fallback could take over): every worker waits 2 s.
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    llm.plan(key, "gpt-test", Answer(headers=spent))
    first = chat("llm_paused_openai", key).get(timeout=30)
    assert first["status"] == "succeeded"
    others = [chat("llm_paused_openai", key) for _ in range(3)]
    for r in others:
        assert r.get(timeout=30)["status"] == "succeeded"
    spending, *after = llm.hits_for(key)
    assert len(after) == 3 and all(h.at - spending.at >= 1.9 for h in after)


def test_the_token_rate_limit_holds_in_every_window(llm: LlmServer, key: str) -> None:
    svc = get_services()["llm_tokens"]
    assert isinstance(svc, LlmService) and svc.token_rate_limit == 1200 and svc.token_burst == 60
    per_second, burst = 1200 / 60, 60

    results = [chat("llm_tokens", key, f"call {i} of ten", max_tokens=8) for i in range(10)]
    for r in results:
        assert r.get(timeout=60)["status"] == "succeeded"

    hits = sorted(llm.hits_for(key), key=lambda h: h.at)
    spent = [(h.at, h.input_tokens + h.output_tokens) for h in hits]
    assert len(spent) == 10 and sum(t for _, t in spent) > burst + per_second  # the limit had to act
    for window in (0.5, 1.0, 2.0, 3.0):
        worst = max(sum(t for u, t in spent if a <= u < a + window) for a, _ in spent)
        assert worst <= burst + per_second * window, (window, worst)
    used = sum(job(r.id)["input_tokens"] + job(r.id)["output_tokens"] for r in results)
    assert used == sum(t for _, t in spent)  # the ledger counts what the provider counted


def test_a_call_asking_for_more_tokens_than_the_burst_still_goes(llm: LlmServer, key: str) -> None:
    # Charged the whole burst at most (never deferred for ever), then settled with what it used.
    out = chat("llm_tokens", key, max_tokens=1000).get(timeout=20)
    assert out["status"] == "succeeded" and out["usage"]["output_tokens"] < 1000


def test_stats_sum_the_tokens_per_service_and_operation(llm: LlmServer, key: str) -> None:
    for _ in range(2):
        chat("llm_anthropic", key).get(timeout=30)
    with get_engine().connect() as conn:
        sums = conn.execute(
            select(func.sum(Job.input_tokens), func.sum(Job.output_tokens)).where(
                Job.service == "llm_anthropic", Job.operation == "chat"
            )
        ).one()
    input_tokens, output_tokens = int(sums[0] or 0), int(sums[1] or 0)
    assert input_tokens >= 2 * 3 and output_tokens >= 2 * 3

    (row,) = [r for r in ledger.stats() if (r["service"], r["operation"]) == ("llm_anthropic", "chat")]
    assert (row["input_tokens"], row["output_tokens"]) == (input_tokens, output_tokens)
    out = cli("stats")
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split()[-2:] == ["INPUT_TOKENS", "OUTPUT_TOKENS"]
    (line,) = [line for line in lines if line.split()[:2] == ["llm_anthropic", "chat"]]
    assert line.split()[-2:] == [str(input_tokens), str(output_tokens)]


def test_the_cli_calls_chat_and_waits_for_the_answer(llm: LlmServer) -> None:
    out = cli(
        "call", "llm_openai", "chat", 'messages=[{"role":"user","content":"hi"}]', "--wait", "--timeout", "30"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and result["meta"]["model"] == "gpt-test"
    assert result["data"]["text"] == "You said: hi" and result["usage"] == {
        "input_tokens": 1,
        "output_tokens": 3,
    }

    listed = cli("services")
    assert (
        "llm_openai (llm openai, http://127.0.0.1:" in listed.stdout
        and "models gpt-test, gpt-test-mini" in listed.stdout
    )
    assert "  chat: chat: messages, system, tools" in listed.stdout and TOKEN not in listed.stdout


def test_the_health_check_lists_the_models_without_spending_a_token(llm: LlmServer) -> None:
    before = len(llm.hits)
    for name in ("llm_openai", "llm_anthropic"):
        checked = health.check(get_services()[name])
        assert checked.ok and checked.status_code == 200
    assert [(h.path, h.protocol, h.status) for h in llm.hits[before:]] == [
        ("/v1/models", "openai", 200),
        ("/v1/models", "anthropic", 200),
    ]
    with pytest.raises(PermanentError, match="HTTP 401"):
        get_services()["llm_wrong_key"].check_health()


@pytest.mark.parametrize(
    ("service", "params", "message"),
    [
        ("llm_openai", {"messages": []}, "messages: fails minItems 1"),
        (
            "llm_openai",
            {"messages": [{"role": "tool", "content": "42"}]},
            "messages.0.tool_call_id: required",
        ),
        (
            "llm_openai",
            {"messages": [{"role": "user", "content": "a", "tool_call_id": "x"}]},
            "only in a message of role tool",
        ),
        (
            "llm_openai",
            {"messages": [{"role": "user", "content": "a"}], "model": "gpt-5"},
            'model: must be one of "gpt-test"',
        ),
        (
            "llm_anthropic",
            {"messages": [{"role": "user", "content": "a"}], "temperature": 1.5},
            "temperature: fails maximum 1",
        ),
        (
            "llm_openai",
            {
                "messages": [{"role": "user", "content": "a"}],
                "tools": [WEATHER],
                "tool_choice": {"name": "other"},
            },
            "tool_choice.name: not the name of one of the tools",
        ),
        (
            "llm_anthropic",
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "t", "name": "f", "arguments": "[1]"}]}
                ]
            },
            "messages.0.tool_calls.0.arguments: must be a JSON object",
        ),
    ],
)
def test_bad_params_are_refused_at_submit(service: str, params: dict[str, Any], message: str) -> None:
    with get_engine().connect() as conn:
        before = conn.execute(select(func.count()).select_from(Job)).scalar_one()
    with pytest.raises(InvalidParams, match=message):
        call_service.delay(service, "chat", params)
    with get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == before


def test_the_chat_schema_is_complete_for_tool_use() -> None:
    schema = get_services()["llm_anthropic"].catalog()["chat"].parameters
    assert schema["required"] == ["messages"] and schema["additionalProperties"] is False
    props = schema["properties"]
    assert set(props) == {
        "messages",
        "system",
        "tools",
        "tool_choice",
        "response_format",
        "max_tokens",
        "temperature",
        "model",
    }
    assert props["model"]["enum"] == ["claude-test", "claude-test-small"]
    assert props["max_tokens"]["default"] == 64 and props["temperature"]["maximum"] == 1
    assert props["messages"]["items"]["properties"]["role"]["enum"] == ["system", "user", "assistant", "tool"]
    assert all(p.get("description") for p in props.values())


def test_the_services_file_names_the_llm_fields_it_refuses(tmp_path: Path) -> None:
    def load(spec: str) -> None:
        path = tmp_path / "services.yaml"
        path.write_text("services:\n  chat:\n    kind: llm\n" + spec)
        load_services(path, Settings())

    with pytest.raises(ConfigError, match=r"services\.chat\.protocol"):
        load("    models: [m]\n")
    with pytest.raises(ConfigError, match="anthropic_version: not a setting of the openai protocol"):
        load("    protocol: openai\n    models: [m]\n    anthropic_version: '2023-06-01'\n")
    with pytest.raises(ConfigError, match=r"services\.chat\.models"):
        load("    protocol: openai\n    models: [m, m]\n")
    with pytest.raises(ValidationError, match="a model's name is 1 to 200 characters"):
        LlmService.model_validate({"name": "x", "protocol": "openai", "models": ["two words"]})
    for protocol, url in (
        ("anthropic", "https://api.anthropic.com"),
        ("openai", "https://api.openai.com/v1"),
    ):
        svc = LlmService.model_validate({"name": "x", "protocol": protocol, "models": ["m"]})
        assert svc.base_url == url  # each protocol's own default
