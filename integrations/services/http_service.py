"""The base of every kind that speaks HTTP: where the service is, how it authenticates, and one
attempt through :func:`integrations.http.send` (still the only place HTTP happens).

A kind overrides :meth:`HttpService.request` (params -> request) and, when its errors are not
just HTTP statuses (Slack's ``ok: false``, GraphQL's ``errors``), :meth:`HttpService.interpret`.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from integrations import http
from integrations.auth import Auth, NoAuth, sent_values, token_auth, tokens
from integrations.config import get_settings
from integrations.config.schema import check_url
from integrations.errors import CallError, ConfigError, PermanentError
from integrations.services.base import Attempt, Operation, Outcome, Service


class HttpService(Service):
    health_path_allowed: ClassVar[bool] = True

    base_url: str
    auth: Auth = NoAuth()
    #: Allow requests to loopback, private and link-local addresses (off: an SSRF guard).
    allow_private_network: bool = False
    #: Non-public networks this service may reach all the same (CIDRs), when
    #: ``allow_private_network`` is off.
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    #: Sent with every request. A value from ``${VAR}`` is treated as a credential.
    headers: dict[str, str] = Field(default_factory=dict)
    #: A CA bundle to trust instead of the system's (a service behind a private CA).
    ca_bundle: Path | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        return check_url(v, what="base_url").rstrip("/")

    @field_validator("ca_bundle")
    @classmethod
    def _ca_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("no such file")
        return v

    @field_validator("headers")
    @classmethod
    def _header_form(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not name or any(c in name for c in ":\r\n \t") or any(c in str(value) for c in "\r\n\x00"):
                raise ValueError("header names are tokens and values have no line breaks")
        return v

    @model_validator(mode="after")
    def _health_needs_own_credential(self) -> HttpService:
        auth = token_auth(self)
        if self.health is not None and auth is not None and auth.per_user:
            raise ValueError(
                "health: a per-user service has no credential of its own to check with; leave health out"
            )
        return self

    # ---- what kinds override -----------------------------------------------------------------

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        """The HTTP request for one attempt at ``op`` (URL under :attr:`base_url`)."""
        raise NotImplementedError

    def interpret(self, resp: http.Response, op: Operation | None) -> Outcome:
        """The outcome of a response: 2xx succeeds with its body; other statuses raise the error
        :func:`integrations.http.classify` gives. A spent rate-limit budget (``x-ratelimit-*``
        headers) sets ``pause`` either way."""
        pause = http.budget_spent_for(resp, cap=self.retry.retry_after_max)
        excerpt = resp.excerpt(get_settings().ledger_body_max_bytes)
        err = http.classify(resp, self.retry.retry_after_max)
        if err is not None:
            raise self.enrich(err, resp, excerpt, pause)
        return Outcome(
            data=resp.data_scrubbed(self.secret_values()),
            status_code=resp.status_code,
            latency_ms=resp.latency_ms,
            excerpt=excerpt,
            pause=pause,
        )

    # ---- the contract ------------------------------------------------------------------------

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        req = self.request(op, params, attempt)
        # The same key on every attempt of a job: an upstream that honours it runs the job once
        # even when our retry follows a lost reply (draft-ietf-httpapi-idempotency-key-header).
        req = replace(req, headers={**req.headers, "Idempotency-Key": attempt.job_id})
        return self.interpret(self.send(req, attempt.connection), op)

    def check_health(self) -> Outcome:
        h = self.health
        if h is not None and h.path is not None:
            return self.interpret(self.send(http.Request("GET", self.base_url + h.path)), None)
        return super().check_health()

    def send(self, req: http.Request, connection: str | None = None) -> http.Response:
        """Send ``req`` through the choke point; the service's own credentials are scrubbed from
        the answer (an upstream that echoes the request must not put them in the ledger).

        With a token-based auth (OAuth2, a GitHub App) the access token of ``connection`` (the
        job's :attr:`Attempt.connection`; the service's own token when its auth is not per
        user) goes on this request only (:mod:`integrations.auth.tokens`)."""
        try:
            if token_auth(self) is not None:
                return tokens.send(self, req, connection, get_settings().response_max_bytes)
            resp = http.send(self, req, get_settings().response_max_bytes)
        except ConfigError as e:  # a secret this process does not have
            raise PermanentError(str(e)) from None
        return resp.scrubbed(self.secret_values())

    @staticmethod
    def enrich(err: CallError, resp: http.Response, excerpt: str | None, pause: float | None) -> CallError:
        err.latency_ms = resp.latency_ms
        err.excerpt = excerpt
        if pause is not None:
            err.pause = max(err.pause or 0.0, pause)
        return err

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), *sent_values(self.auth)]

    def describe(self) -> str:
        return f"{self.kind}, {self.base_url}, auth {self.auth.type}"
