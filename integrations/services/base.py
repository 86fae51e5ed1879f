"""What every kind of service is: its config, its operations, one call, its health check.

A kind is a subclass of :class:`Service` (a pydantic model: its own fields are its section of
the services file, chosen by ``kind:``), registered under the ``integrations.kinds`` entry-point
group. It implements:

- :meth:`Service.catalog`: its operations, declared in the file or built in, each with a JSON
  Schema of its parameters (:class:`Operation`);
- :meth:`Service.call`: one attempt, returning an :class:`Outcome` or raising the project's
  typed errors (:class:`~integrations.errors.PermanentError`, ``TransientError``,
  ``RateLimited`` with its ``retry_after``), with ``pause`` set when the upstream says the
  whole service must slow down;
- optionally :meth:`Service.check_health` (default: the health operation), :meth:`Service.scopes`
  (rate limits of its own, per method or channel or tokens) and :meth:`Service.secret_values`.

Retries, pooling of jobs, rate limits, breakers, idempotency and the ledger belong to the job
path, which every kind shares: a kind does its protocol and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr, model_validator

from integrations.config.schema import Breaker, HealthCheck, Rate, RateSpec, RetryPolicy, Strict, parse_rate
from integrations.config.secrets import Secret
from integrations.errors import InvalidParams
from integrations.services.params import Params, object_schema

#: ``{name}`` placeholders, the only kind a template may have.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Attempt:
    """Which try of which job a call is: kinds derive idempotency keys and Message-IDs from it."""

    job_id: str
    number: int = 1
    agent: str | None = None
    #: The end user's connection the job acts for (``call_service.delay(..., connection=...)``);
    #: a kind with per-user auth sends that connection's token.
    connection: str | None = None


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Outcome:
    """A successful attempt. ``data`` goes to the caller; ``excerpt`` (bounded) and ``meta`` to
    the ledger; ``pause`` asks every worker to hold this service's calls that many seconds."""

    data: Any = None
    status_code: int | None = None
    latency_ms: float | None = None
    excerpt: str | None = None
    usage: Usage | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    pause: float | None = None


@dataclass(frozen=True)
class Scope:
    """A rate limit of the kind's own beside the service's (a Slack method, a channel, an LLM's
    tokens). ``key`` is unique within the service; ``cost`` is how much of it this call takes."""

    key: str
    rate: Rate | None
    cost: int = 1


class Operation(Strict):
    """One thing a service can do. Subclasses say how params become a call; every operation has
    :attr:`schema`, the JSON Schema of its params, and validates them with it."""

    description: str = ""

    _params: Params = PrivateAttr()

    def build_parameters(self) -> dict[str, Any]:
        """The JSON Schema of this operation's params (an ``object``)."""
        return object_schema({}, [])

    @model_validator(mode="after")
    def _compile(self) -> Operation:
        self._params = Params(self.build_parameters())
        return self

    @property
    def parameters(self) -> dict[str, Any]:
        return self._params.schema

    def validate_params(self, params: Any) -> dict[str, Any]:
        """The params checked and coerced; raises :class:`InvalidParams` naming each problem."""
        return self._params.validate(params)


class Service(Strict):
    """The fields every kind has, and the contract each implements."""

    #: Whether ``health: {path: ...}`` means something to this kind (HTTP kinds).
    health_path_allowed: ClassVar[bool] = False
    #: Whether the kind has a protocol-level check of its own (:meth:`check_health` without an
    #: operation): ``health: {interval: 60}`` is then enough.
    health_own_check: ClassVar[bool] = False

    name: str
    #: The value of ``kind:`` that picks the class: each kind narrows it to a ``Literal``.
    kind: str
    description: str = ""
    timeout: float = Field(10, gt=0, le=600)
    #: Calls per second, minute or hour ("20/s", "5000/h"): a global limit shared by every
    #: worker through Redis (Celery's per-worker rate_limit on the embedded defaults).
    rate_limit: RateSpec = None
    #: Calls that may go at once before the rate applies.
    burst: int = Field(1, ge=1, le=10000)
    #: The same, for each agent (``call_service.delay(..., agent="name")``) on its own, so one
    #: busy agent cannot take the whole service's budget.
    agent_rate_limit: RateSpec = None
    agent_burst: int = Field(1, ge=1, le=10000)
    #: The same, for each end user's connection (``call_service.delay(..., connection="alice")``):
    #: the provider's own quota per user.
    connection_rate_limit: RateSpec = None
    connection_burst: int = Field(1, ge=1, le=10000)
    retry: RetryPolicy = RetryPolicy()
    breaker: Breaker | None = Breaker()
    health: HealthCheck | None = None

    #: Values from the environment that this service sends as credentials besides its secret
    #: fields (a fixed header from ``${VAR}``), set by the loader.
    _extra_secrets: tuple[str, ...] = PrivateAttr(default=())

    # ---- the contract ------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, Operation]:
        """The service's operations by name."""
        raise NotImplementedError

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        """Make one attempt at ``op`` with validated ``params``."""
        raise NotImplementedError

    def check_health(self) -> Outcome:
        """One health check; raises a typed error when unhealthy. Default: the health operation."""
        h = self.health
        if h is None or h.operation is None:
            raise ValueError(f"service {self.name} has no health operation")
        op = self.catalog()[h.operation]
        return self.call(op, op.validate_params(h.params), Attempt(job_id=f"health-{self.name}"))

    def scopes(self, op: Operation, params: dict[str, Any]) -> list[Scope]:
        """Rate limits of the kind's own for this call, beside the service's and the agent's."""
        return []

    def connection_scopes(self, connection: str | None) -> list[Scope]:
        """The limit of the end user's connection a job acts for (``connection_rate_limit``), a
        scope ``connection:<name>`` beside the kind's own; none without a connection or a limit."""
        limit = parse_rate(self.connection_rate_limit, self.connection_burst)
        if connection is None or limit is None:
            return []
        return [Scope(f"connection:{connection}", limit)]

    def settle(self, op: Operation, params: dict[str, Any], outcome: Outcome) -> list[tuple[Scope, int]]:
        """``(scope, real cost)`` of the scopes whose cost was an estimate before the call (an
        LLM's tokens), so the limiter counts what was spent."""
        return []

    def describe(self) -> str:
        """A line for ``integrations services``: where the service is, how it authenticates."""
        return self.kind

    def describe_operation(self, name: str, op: Operation) -> str:
        return op.description.splitlines()[0] if op.description else ""

    # ---- shared ------------------------------------------------------------------------------

    @property
    def global_limit(self) -> Rate | None:
        return parse_rate(self.rate_limit, self.burst)

    @property
    def agent_limit(self) -> Rate | None:
        return parse_rate(self.agent_rate_limit, self.agent_burst)

    def secrets(self) -> list[Secret]:
        """Every secret field of this service's config, however deep."""
        return list(_secrets_in(self))

    def secret_values(self) -> list[str]:
        """The credentials this process has for the service: masked in whatever it stores."""
        values = [s.get() for s in self.secrets() if s.available]
        return [v for v in (*values, *self._extra_secrets) if v]

    def operation(self, name: str) -> Operation | None:
        return self.catalog().get(name)

    @model_validator(mode="after")
    def _health_target(self) -> Service:
        h = self.health
        if h is not None and h.path is not None and not self.health_path_allowed:
            raise ValueError("health.path: this kind is checked through an operation")
        if h is not None and h.path is None and h.operation is None and not self.health_own_check:
            raise ValueError("health: this kind has no check of its own; set operation (or path)")
        if h is not None and h.operation is not None:
            op = self.catalog().get(h.operation)
            if op is None:
                raise ValueError("health.operation: not one of this service's operations")
            try:
                op.validate_params(h.params)
            except InvalidParams as e:
                raise ValueError(f"health.params: {e}") from None
        return self


def _secrets_in(node: Any) -> list[Secret]:
    if isinstance(node, Secret):
        return [node]
    if isinstance(node, Strict):
        return [s for name in type(node).model_fields for s in _secrets_in(getattr(node, name))]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _secrets_in(v)]
    if isinstance(node, list | tuple):
        return [s for v in node for s in _secrets_in(v)]
    return []
