"""Slack's Web API with a bot token: seven built-in operations (:mod:`integrations.services.slack_ops`),
Slack's ``ok: false`` answers mapped onto the project's errors in one place
(:mod:`integrations.services.slack_errors`), and each method's rate-limit tier enforced by the global limiter.

::

    team_chat:
      kind: slack
      token: ${SLACK_BOT_TOKEN}                 # xoxb-...; sent as Authorization: Bearer
      # base_url: https://slack.com/api         # the default
      method_limits:                            # override a method's tier (every worker)
        chat.postMessage: 100/m
        conversations.history: {rate: 1/m, burst: 15}
      channel_limit: 1/s                        # posting, per channel (the default)
      health: {interval: 300}                   # auth.test

Limits are scopes of the service (:meth:`SlackService.scopes`): ``method:<api method>`` for
every call, ``channel:<id>`` for posting. A ``ratelimited`` answer (or HTTP 429) pauses the
method's scope on every worker for its Retry-After; other methods go on.

``upload_file`` is Slack's two-step external upload: ``files.getUploadURLExternal``, the bytes
POSTed to the ``upload_url`` it returns (another origin: sent without the bot token, through a
peer of its own whose SSRF guard is always on; only the service's ``allowed_networks`` are
allowed besides public addresses), then ``files.completeUploadExternal``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlencode, urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from integrations import http
from integrations.auth import BearerAuth, NoAuth
from integrations.config import get_settings
from integrations.config.schema import Rate, Strict, check_rate, parse_rate
from integrations.errors import ConfigError, PermanentError
from integrations.services.base import Attempt, Operation, Outcome, Scope
from integrations.services.http_service import HttpService
from integrations.services.slack_errors import api_error, body_of, upload_error, warnings
from integrations.services.slack_ops import AUTH_TEST, METHODS, SlackOperation, catalog
from integrations.ssrf import Network

JSON = "application/json; charset=utf-8"
FORM = "application/x-www-form-urlencoded"
#: The scope a 429 from the upload host pauses: uploads only.
UPLOADS = "files:upload"
GET_UPLOAD_URL, COMPLETE_UPLOAD = "files.getUploadURLExternal", "files.completeUploadExternal"


class Limit(Strict):
    """A rate limit in the services file: ``100/m`` (burst 1) or ``{rate: 100/m, burst: 5}``."""

    rate: Annotated[str, AfterValidator(check_rate)]
    burst: int = Field(1, ge=1, le=10000)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"rate": v} if isinstance(v, str) else v

    def as_rate(self) -> Rate:
        rate = parse_rate(self.rate, self.burst)
        assert rate is not None
        return rate


@dataclass(frozen=True)
class _UploadHost:
    """The upload URL's host as a :class:`integrations.http.Peer`: no credentials, no headers
    of the service's, and the SSRF guard always on."""

    name: str
    timeout: float
    allowed_networks: tuple[Network, ...]
    ca_bundle: Path | None
    allow_private_network: bool = False
    auth: NoAuth = field(default_factory=NoAuth)
    headers: dict[str, str] = field(default_factory=dict)


class SlackService(HttpService):
    kind: Literal["slack"] = "slack"
    health_own_check: ClassVar[bool] = True
    health_path_allowed: ClassVar[bool] = False

    base_url: str = "https://slack.com/api"
    #: Limits per Web API method that replace the method's tier (``None``: no limit of ours;
    #: Slack's ``ratelimited`` still pauses the method).
    method_limits: dict[str, Limit | None] = Field(default_factory=dict)
    #: Posting (``post_message``), per channel: Slack allows about one message a second.
    channel_limit: Limit | None = Limit(rate="1/s")

    @model_validator(mode="before")
    @classmethod
    def _token_is_the_auth(cls, data: Any) -> Any:
        """``token:`` is the bot token, sent as a bearer token (``auth:`` says the same at length)."""
        if isinstance(data, Mapping) and "token" in data:
            if "auth" in data:
                raise ValueError("token: give the bot token once, as token: (not also auth:)")
            rest = {k: v for k, v in data.items() if k != "token"}
            return {**rest, "auth": {"type": "bearer", "token": data["token"]}}
        return data

    @model_validator(mode="after")
    def _bearer(self) -> SlackService:
        if not isinstance(self.auth, BearerAuth):
            raise ValueError("token: required (the bot token, xoxb-..., e.g. ${SLACK_BOT_TOKEN})")
        return self

    @field_validator("method_limits")
    @classmethod
    def _known_methods(cls, v: dict[str, Limit | None]) -> dict[str, Limit | None]:
        unknown = sorted(set(v) - set(METHODS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a method this kind calls ({', '.join(METHODS)})")
        return v

    # ---- the contract ------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, SlackOperation]:
        return catalog()

    def scopes(self, op: Operation, params: dict[str, Any]) -> list[Scope]:
        """``method:<api method>`` for each method the operation calls, ``channel:<id>`` when
        it posts, and the upload host's pause for an upload."""
        assert isinstance(op, SlackOperation)
        out = [Scope(f"method:{m}", self.method_rate(m)) for m in op.methods]
        if op.channel_param is not None:
            channel = str(params[op.channel_param]).lstrip("#")
            out.append(
                Scope(f"channel:{channel}", self.channel_limit.as_rate() if self.channel_limit else None)
            )
        if GET_UPLOAD_URL in op.methods:
            out.append(Scope(UPLOADS, None))
        return out

    def method_rate(self, method: str) -> Rate | None:
        """The limit a method is held to: the services file's, else its tier's."""
        if method in self.method_limits:
            limit = self.method_limits[method]
            return limit.as_rate() if limit is not None else None
        return METHODS[method].limit

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        assert isinstance(op, SlackOperation)
        return self.api_request(op.method, op.arguments(params))

    def interpret(self, resp: http.Response, op: Operation | None) -> Outcome:
        method = op.method if isinstance(op, SlackOperation) else AUTH_TEST
        return self._outcome(method, resp, self.answer(method, resp))

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        assert isinstance(op, SlackOperation)
        if GET_UPLOAD_URL in op.methods:
            return self._upload(params, attempt)
        return super().call(op, params, attempt)

    def check_health(self) -> Outcome:
        """``auth.test``: the token is valid for the workspace (unless ``health`` names an operation)."""
        if self.health is not None and self.health.operation is not None:
            return super().check_health()
        return self.interpret(self.send(self.api_request(AUTH_TEST, {})), None)

    def describe(self) -> str:
        return f"slack, {self.base_url}, bot token"

    def describe_operation(self, name: str, op: Operation) -> str:
        assert isinstance(op, SlackOperation)
        return " + ".join(op.methods)

    # ---- one method ----------------------------------------------------------------------------

    def api_request(self, method: str, args: Mapping[str, Any]) -> http.Request:
        """A call of ``method`` with ``args``, sent as the method takes them (see slack_ops)."""
        url = f"{self.base_url}/{method}"
        wire = METHODS[method].wire if method in METHODS else "query"
        if wire == "json":
            body = json.dumps(args, ensure_ascii=False, separators=(",", ":")).encode()
            return http.Request("POST", url, content=body, headers={"Content-Type": JSON})
        pairs = {k: _text(v) for k, v in args.items()}
        if wire == "form":
            return http.Request(
                "POST", url, content=urlencode(pairs).encode(), headers={"Content-Type": FORM}
            )
        return http.Request("GET", url, params=pairs)

    def answer(self, method: str, resp: http.Response) -> dict[str, Any]:
        """The body of a successful answer; raises the error :func:`api_error` makes of any other."""
        body = body_of(resp)
        err = api_error(method, resp, body, self.retry.retry_after_max)
        if err is not None:
            err.excerpt = resp.excerpt(get_settings().ledger_body_max_bytes)
            raise err
        assert body is not None
        return body

    def _outcome(self, method: str, resp: http.Response, body: dict[str, Any]) -> Outcome:
        found = warnings(body)
        return Outcome(
            data=body,
            status_code=resp.status_code,
            latency_ms=resp.latency_ms,
            excerpt=resp.excerpt(get_settings().ledger_body_max_bytes),
            meta={"method": method, **({"warnings": found} if found else {})},
        )

    # ---- upload_file ---------------------------------------------------------------------------

    def _upload(self, params: dict[str, Any], attempt: Attempt) -> Outcome:
        """files.getUploadURLExternal, the bytes to its upload_url, files.completeUploadExternal:
        one attempt; a retry starts again with a new upload URL."""
        data = _content(params)
        key = {"Idempotency-Key": attempt.job_id}
        first = {"filename": params["filename"], "length": len(data)}
        first |= {k: params[k] for k in ("alt_txt", "snippet_type") if k in params}
        got = self.send(_with(self.api_request(GET_UPLOAD_URL, first), key), attempt.connection)
        ticket = self.answer(GET_UPLOAD_URL, got)
        upload_url, file_id = ticket.get("upload_url"), ticket.get("file_id")
        if not (isinstance(upload_url, str) and isinstance(file_id, str) and file_id):
            raise PermanentError(f"slack {GET_UPLOAD_URL}: the answer has no upload_url or file_id")
        sent = self._send_bytes(upload_url, data)
        files = [{"id": file_id, **({"title": params["title"]} if "title" in params else {})}]
        second: dict[str, Any] = {"files": files}
        second |= {k: params[k] for k in ("channel_id", "initial_comment", "thread_ts") if k in params}
        done = self.send(_with(self.api_request(COMPLETE_UPLOAD, second), key), attempt.connection)
        body = self.answer(COMPLETE_UPLOAD, done)
        found = [*warnings(ticket), *warnings(body)]
        return Outcome(
            data=body,
            status_code=done.status_code,
            latency_ms=got.latency_ms + sent.latency_ms + done.latency_ms,
            # The upload URL (a credential while it lasts) is in neither.
            excerpt=done.excerpt(get_settings().ledger_body_max_bytes),
            meta={"method": COMPLETE_UPLOAD, "file_id": file_id, **({"warnings": found} if found else {})},
        )

    def _send_bytes(self, url: str, data: bytes) -> http.Response:
        """POST ``data`` to Slack's upload URL: another origin, so without the bot token or the
        service's headers, and never to a private address outside ``allowed_networks``."""
        parts = urlsplit(url)
        https_only = urlsplit(self.base_url).scheme == "https"
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or (https_only and parts.scheme != "https")
        ):
            raise PermanentError(f"slack {GET_UPLOAD_URL}: the upload_url it gave is not an https URL")
        host = _UploadHost(f"{self.name}:upload", self.timeout, tuple(self.allowed_networks), self.ca_bundle)
        req = http.Request(
            "POST",
            url,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            follow_redirects=False,
        )
        try:
            resp = http.send(host, req, get_settings().response_max_bytes).scrubbed(self.secret_values())
        except ConfigError as e:
            raise PermanentError(str(e)) from None
        err = upload_error(parts.hostname, resp, self.retry.retry_after_max, UPLOADS)
        if err is not None:
            raise err
        return resp


def _text(value: Any) -> str:
    """A value as a query or form argument: booleans as Slack writes them, structures as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _content(params: Mapping[str, Any]) -> bytes:
    content: str = params["content"]
    return base64.b64decode(content) if params.get("encoding") == "base64" else content.encode()


def _with(req: http.Request, headers: Mapping[str, str]) -> http.Request:
    return replace(req, headers={**req.headers, **headers})
