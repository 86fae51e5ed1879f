"""Chat with LLM providers: the ``llm`` kind, with one built-in operation, ``chat``.

::

    services:
      assistant:
        kind: llm
        protocol: anthropic            # or openai: OpenAI, OpenWebUI, vLLM, Ollama, ...
        auth: {type: api_key, key: ${ANTHROPIC_API_KEY}}   # x-api-key; openai: {type: bearer, token: ...}
        models: [claude-sonnet-4-5, claude-haiku-4-5]      # the primary, then fallbacks
        token_rate_limit: 40000        # tokens per minute, shared by every worker
        rate_limit: 50/m
        timeout: 90                    # seconds a generation may take

Two wire protocols (:mod:`llm_openai`, :mod:`llm_anthropic`), one shape of params and result
(:mod:`llm_chat`). One attempt tries the models in order: a model that is rate-limited or
overloaded passes the turn to the next (each model once); any other answer, success or error,
is the attempt's. The job keeps which model answered (``meta["model"]``) and the tokens used.
When every model is limited the attempt is :class:`RateLimited` with the longest wait they
gave, which holds every worker's calls to the service that long.

``token_rate_limit`` is a scope of the global limiter beside ``rate_limit``: a call is charged
an estimate before it goes (:func:`llm_chat.estimate_tokens`) and settled with the provider's
usage after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from integrations import http
from integrations.config import get_settings
from integrations.config.schema import Rate
from integrations.errors import CallError, RateLimited
from integrations.services.base import Attempt, Operation, Outcome, Scope, Usage
from integrations.services.http_service import HttpService
from integrations.services.llm_anthropic import DEFAULT_BASE_URL as ANTHROPIC_URL
from integrations.services.llm_anthropic import DEFAULT_VERSION, AnthropicWire
from integrations.services.llm_chat import (
    ChatOperation,
    ProtocolName,
    Wire,
    bounded,
    estimate_tokens,
    longest,
)
from integrations.services.llm_openai import DEFAULT_BASE_URL as OPENAI_URL
from integrations.services.llm_openai import MaxTokensField, OpenAIWire

DEFAULT_BASE_URLS: dict[str, str] = {"openai": OPENAI_URL, "anthropic": ANTHROPIC_URL}


class LlmService(HttpService):
    health_own_check: ClassVar[bool] = True

    kind: Literal["llm"] = "llm"
    protocol: ProtocolName
    #: The primary model, then the fallbacks tried when it is rate-limited or overloaded.
    models: tuple[str, ...] = Field(min_length=1, max_length=10)
    #: Models a call may name in its ``model`` param besides ``models`` (each alone, no fallback).
    allowed_models: tuple[str, ...] = ()
    #: A call's ``max_tokens`` when it gives none (Anthropic's API requires one).
    default_max_tokens: int = Field(1024, ge=1, le=1_000_000)
    #: Tokens per minute (input and output), shared by every worker through the global limiter.
    token_rate_limit: int | None = Field(None, ge=1)
    #: Tokens that may go at once before ``token_rate_limit`` applies (default: a minute's worth,
    #: the size of the providers' own token buckets).
    token_burst: int | None = Field(None, ge=1)
    #: A generation takes a while: seconds to wait for the answer (keep it below the task's
    #: soft time limit, TASK_SOFT_TIME_LIMIT, which ends the attempt first).
    timeout: float = Field(90, gt=0, le=600)
    #: anthropic only: the API version sent as ``anthropic-version``.
    anthropic_version: str = Field(DEFAULT_VERSION, pattern=r"^\d{4}-\d{2}-\d{2}$")
    #: openai only: the name of the answer's token limit in the request. ``max_tokens`` for
    #: servers that know only the older name; OpenAI's reasoning models take only the newer.
    max_tokens_field: MaxTokensField = "max_completion_tokens"

    _ops: dict[str, Operation] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_base_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "base_url" not in data and data.get("protocol") in DEFAULT_BASE_URLS:
            return {**data, "base_url": DEFAULT_BASE_URLS[data["protocol"]]}
        return data

    @field_validator("models", "allowed_models")
    @classmethod
    def _model_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # What the provider calls it: gpt-4o, meta-llama/Llama-3.1-8B, qwen3:8b.
        for name in v:
            if not name or len(name) > 200 or any(c.isspace() or ord(c) < 32 for c in name):
                raise ValueError("a model's name is 1 to 200 characters without spaces")
        if len(set(v)) != len(v):
            raise ValueError("a model is listed twice")
        return v

    @model_validator(mode="after")
    def _protocol_fields(self) -> LlmService:
        other = {"openai": "anthropic_version", "anthropic": "max_tokens_field"}[self.protocol]
        if other in self.model_fields_set:
            raise ValueError(f"{other}: not a setting of the {self.protocol} protocol")
        return self

    @property
    def wire(self) -> Wire:
        if self.protocol == "anthropic":
            return AnthropicWire(self.anthropic_version)
        return OpenAIWire(self.max_tokens_field)

    # ---- the contract ------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, Operation]:
        if self._ops is None:
            self._ops = {
                "chat": ChatOperation(
                    protocol=self.protocol,
                    models=self.models,
                    allowed_models=self.allowed_models,
                    default_max_tokens=self.default_max_tokens,
                )
            }
        return self._ops

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        """One attempt: each model in turn while they are limited; the first other answer is it."""
        assert isinstance(op, ChatOperation)
        wire = self.wire
        models = [params["model"]] if "model" in params else list(self.models)
        max_tokens = int(params.get("max_tokens", self.default_max_tokens))
        limited: list[tuple[str, RateLimited]] = []
        spent_ms = 0.0
        for i, model in enumerate(models):
            # The job id on every attempt at the same request; a fallback's request is another
            # request, with a key of its own (a server that honours keys would refuse reuse).
            key = attempt.job_id if i == 0 else f"{attempt.job_id}-fallback-{i}"
            req = http.Request(
                "POST",
                self.base_url + wire.chat_path,
                json=wire.body(params, model, max_tokens),
                headers={**wire.headers(), "Idempotency-Key": key},
            )
            resp = self.send(req, attempt.connection)
            spent_ms += resp.latency_ms
            excerpt = resp.excerpt(get_settings().ledger_body_max_bytes)
            err = wire.error(resp, model, self.retry.retry_after_max)
            if isinstance(err, RateLimited):
                self._enriched(err, resp, excerpt, spent_ms)
                limited.append((model, err))
                continue
            if err is not None:
                raise self._enriched(err, resp, excerpt, spent_ms, limited)
            result = wire.result(resp.data(), params, model)
            usage = result["usage"]
            meta: dict[str, Any] = {"model": result["model"], "finish_reason": result["finish_reason"]}
            if limited:
                meta["limited"] = _limited_meta(limited)
            request_id = resp.headers.get("x-request-id") or resp.headers.get("request-id")
            if request_id:
                meta["request_id"] = request_id[:100]
            # A spent budget holds the service only when no fallback is left to take over.
            pause = wire.budget_spent(resp) if model == models[-1] else None
            return Outcome(
                data=dict(result),
                status_code=resp.status_code,
                latency_ms=spent_ms,
                excerpt=excerpt,
                usage=Usage(usage["input_tokens"], usage["output_tokens"]) if usage else None,
                meta=meta,
                pause=None if pause is None else min(pause, self.retry.retry_after_max),
            )
        raise _all_limited(limited)

    def check_health(self) -> Outcome:
        """The models list (``GET /models``): the credentials and the server, without a token spent."""
        h = self.health
        if h is not None and (h.path is not None or h.operation is not None):
            return super().check_health()
        wire = self.wire
        resp = self.send(http.Request("GET", self.base_url + wire.models_path, headers=wire.headers()))
        err = wire.error(resp, "models", self.retry.retry_after_max)
        if err is not None:
            raise self.enrich(err, resp, resp.excerpt(get_settings().ledger_body_max_bytes), None)
        return Outcome(status_code=resp.status_code, latency_ms=resp.latency_ms)

    def scopes(self, op: Operation, params: dict[str, Any]) -> list[Scope]:
        if self.token_rate_limit is None:
            return []
        rate = Rate(self.token_rate_limit / 60, self.token_burst or self.token_rate_limit)
        return [Scope("tokens", rate, cost=estimate_tokens(params, self.default_max_tokens))]

    def settle(self, op: Operation, params: dict[str, Any], outcome: Outcome) -> list[tuple[Scope, int]]:
        if outcome.usage is None:
            return []  # the estimate stands
        spent = outcome.usage.input_tokens + outcome.usage.output_tokens
        return [(scope, spent) for scope in self.scopes(op, params)]

    def describe(self) -> str:
        tokens = f", {self.token_rate_limit} tokens/min" if self.token_rate_limit else ""
        return f"llm {self.protocol}, {self.base_url}, models {', '.join(self.models)}{tokens}"

    def describe_operation(self, name: str, op: Operation) -> str:
        return "chat: messages, system, tools, tool_choice, response_format, max_tokens, temperature, model"

    def _enriched(
        self,
        err: CallError,
        resp: http.Response,
        excerpt: str | None,
        spent_ms: float,
        limited: list[tuple[str, RateLimited]] | None = None,
    ) -> CallError:
        self.enrich(err, resp, excerpt, None)
        err.latency_ms = spent_ms
        if limited:
            err.meta["limited"] = _limited_meta(limited)
        return err


def _limited_meta(limited: list[tuple[str, RateLimited]]) -> list[dict[str, Any]]:
    return [{"model": m, "status_code": e.status_code, "retry_after": e.retry_after} for m, e in limited]


def _all_limited(limited: list[tuple[str, RateLimited]]) -> RateLimited:
    """Every model was limited: wait the longest any of them asked, so each is free again."""
    wait = longest(e.retry_after for _, e in limited)
    last = limited[-1][1]
    what = "; ".join(str(e) for _, e in limited)
    err = RateLimited(
        what if len(limited) == 1 else bounded(f"every model is rate-limited or overloaded ({what})", 700),
        retry_after=wait,
        status_code=last.status_code,
        latency_ms=last.latency_ms,
        excerpt=last.excerpt,
    )
    err.meta["limited"] = _limited_meta(limited)
    return err
