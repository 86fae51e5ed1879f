"""The typed errors of the project, and what each says about retrying.

::

    IntegrationError                 base; never carries a secret in its message
    +-- ConfigError                  the settings or the services file are wrong (start-up)
    +-- SubmitError                  a job could not be accepted (caller's fault or broker down)
    |   +-- UnknownService
    |   +-- UnknownOperation
    |   +-- InvalidParams
    +-- CallError                    one upstream call went wrong
        +-- PermanentError           do not retry: 4xx (but 408/429), refused address, bad response
        +-- TransientError           retry with backoff: connection errors, timeouts, 408, 5xx
            +-- RateLimited          retry no earlier than ``retry_after`` seconds (429, 503)
    +-- WebhookRefused               an incoming webhook was refused (nothing stored); ``status``
        +-- BadSignature             401: missing or wrong signature, stale or future timestamp
        +-- MalformedBody            400: the body or a required header does not parse

Celery rebuilds a task's exception in the caller from its class and ``args``, so every class
here is constructible from its message alone; the extra attributes are keyword-only.
"""

from __future__ import annotations

from typing import Any


class IntegrationError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(IntegrationError):
    """The settings or the services file are invalid; the message names the field."""


class SubmitError(IntegrationError):
    """A job was refused before anything was written or queued (or the broker was down)."""


class UnknownService(SubmitError):
    pass


class UnknownOperation(SubmitError):
    pass


class InvalidParams(SubmitError):
    pass


class CallError(IntegrationError):
    """An upstream call failed. ``status_code`` is the protocol's status (HTTP, SMTP reply
    code) when there was an answer; ``excerpt`` a bounded, scrubbed part of it for the ledger;
    ``pause`` how long every worker should hold the service's calls (its budget is spent)."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        latency_ms: float | None = None,
        excerpt: str | None = None,
        pause: float | None = None,
        scope: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.latency_ms = latency_ms
        self.excerpt = excerpt
        self.pause = pause
        #: The part of the service ``pause`` holds (a Slack method: ``Scope.key``); ``None``: all of it.
        self.scope = scope
        #: What the job keeps of a failure beside its message (a GraphQL error list, ...).
        self.meta: dict[str, Any] = {}


class PermanentError(CallError):
    """Trying again will not help: fail the job now."""


class TransientError(CallError):
    """The next try may succeed: retry with exponential backoff."""

    retryable = True


class RateLimited(TransientError):
    """The upstream asked us to wait; ``retry_after`` is in seconds (``None`` when it did not
    say). Every worker holds the service's calls that long."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        if self.pause is None:
            self.pause = retry_after


class WebhookRefused(IntegrationError):
    """An incoming webhook was refused before anything was stored; ``status`` is the HTTP answer."""

    status = 400


class BadSignature(WebhookRefused):
    status = 401


class MalformedBody(WebhookRefused):
    status = 400
