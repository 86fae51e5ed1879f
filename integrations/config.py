"""Settings from the environment and services from the services file, validated at start-up.

Every error is a :class:`~integrations.errors.ConfigError` whose message names the service and
the field and never the value, so a broken configuration cannot print a secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import string
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from integrations.errors import ConfigError, InvalidParams

# --------------------------------------------------------------------------------------------
# Settings (environment)
# --------------------------------------------------------------------------------------------

#: Settings that may hold a secret can also be read from a file named by ``NAME_FILE``.
_FILE_SETTINGS = ("BROKER_URL", "RESULT_BACKEND", "DATABASE_URL", "FLOWER_PASSWORD")


class Settings(BaseSettings):
    """The process's settings. Defaults are the embedded ones: no Redis, no Postgres."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    broker_url: str = "filesystem://localhost/"
    result_backend: str | None = None
    database_url: str = "sqlite:///var/integrations.db"
    services_file: Path = Path("services.yaml")
    var_dir: Path = Path("var")

    ledger_body_max_bytes: int = Field(4096, ge=0, le=1_000_000)
    response_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)

    worker_autoscale_max: int = Field(8, ge=1, le=256)
    worker_autoscale_min: int = Field(2, ge=1, le=256)
    worker_prefetch_multiplier: int = Field(4, ge=1, le=64)
    task_soft_time_limit: float = Field(120, gt=0)
    task_time_limit: float = Field(150, gt=0)
    #: The longest countdown a retry may sit on the broker. Redis redelivers a message left
    #: unacknowledged past its visibility timeout, so this must stay well below it.
    max_countdown: int = Field(900, ge=1)
    visibility_timeout: int = Field(3600, ge=60)
    #: A job queued this long without being claimed is presumed lost and published again
    #: (running jobs: past the task time limit; waiting ones: past the longest countdown).
    stuck_after: int = Field(900, ge=5)
    #: How long a worker keeps retrying a ledger write, with backoff, while the database is
    #: unreachable, so no outcome of a call already made is lost to a database restart.
    ledger_retry_for: float = Field(300, ge=0)

    #: Task events feed Flower (operators watch the workers there); TASK_EVENTS=false saves
    #: their cost where nobody watches.
    task_events: bool = True

    #: The Redis that workers share for global rate limits, pauses and breakers. Defaults to
    #: a Redis broker; empty on the embedded defaults (then there is nothing to share).
    coordination_url: str | None = None
    #: A deferral (rate limit, open breaker, pause) up to this long is a broker countdown;
    #: a longer one is parked in the ledger and re-queued by beat's dispatcher.
    defer_countdown_max: int = Field(30, ge=1)

    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    #: Where the webhook receiver listens (``integrations receiver``, started by ``make run``).
    receiver_host: str = "127.0.0.1"
    receiver_port: int = Field(8000, ge=1, le=65535)
    #: A webhook body over this size is refused with 413 before it is read whole.
    webhook_max_body_bytes: int = Field(1024 * 1024, ge=1024, le=100 * 1024 * 1024)
    #: Modules whose ``@handler`` functions receive events, comma-separated (imported by workers).
    event_handlers: str = ""
    #: A failing handler is retried this many times, after about ``backoff`` * 2^n seconds
    #: (full jitter), before its handling is recorded failed.
    handler_max_retries: int = Field(5, ge=0, le=100)
    handler_retry_backoff: int = Field(2, ge=1, le=3600)

    #: Outgoing webhooks: seconds before each try (the first is the immediate one). After the
    #: last, the delivery has failed. The default follows the leading delivery services.
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    webhook_timeout: float = Field(10, gt=0, le=120)
    #: An endpoint with no successful delivery for this long (seconds) is disabled.
    webhook_disable_after: float = Field(5 * 86400, ge=1)
    #: Networks outgoing deliveries may reach although they are not public (e.g. 127.0.0.0/8
    #: in tests), comma-separated. Everything else non-public is refused (an SSRF guard).
    webhook_allowed_networks: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.worker_autoscale_min > self.worker_autoscale_max:
            raise ValueError("WORKER_AUTOSCALE_MIN must not exceed WORKER_AUTOSCALE_MAX")
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("TASK_SOFT_TIME_LIMIT must be below TASK_TIME_LIMIT")
        if self.max_countdown * 2 > self.visibility_timeout:
            raise ValueError("MAX_COUNTDOWN must be at most half of VISIBILITY_TIMEOUT")
        if self.defer_countdown_max > self.max_countdown:
            raise ValueError("DEFER_COUNTDOWN_MAX must be at most MAX_COUNTDOWN")
        if self.coordination_url is None and self.broker_url.startswith(("redis://", "rediss://")):
            self.coordination_url = self.broker_url
        _ = self.retry_schedule, self.allowed_networks  # fail at start-up, not at the first delivery
        return self

    @property
    def handler_modules(self) -> list[str]:
        return [m.strip() for m in self.event_handlers.split(",") if m.strip()]

    @property
    def retry_schedule(self) -> list[float]:
        try:
            steps = [float(x) for x in self.webhook_retry_schedule.split(",")]
        except ValueError:
            raise ValueError("WEBHOOK_RETRY_SCHEDULE must be comma-separated seconds") from None
        if not steps or any(x < 0 for x in steps):
            raise ValueError("WEBHOOK_RETRY_SCHEDULE must be comma-separated seconds, none negative")
        return steps

    @property
    def allowed_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        try:
            return tuple(ip_network(n.strip()) for n in self.webhook_allowed_networks.split(",") if n.strip())
        except ValueError:
            raise ValueError("WEBHOOK_ALLOWED_NETWORKS must be comma-separated networks (CIDR)") from None

    @property
    def results_url(self) -> str:
        """Where task results go: ``RESULT_BACKEND``, else Redis beside a Redis broker, else the DB."""
        if self.result_backend:
            return self.result_backend
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        if self.database_url.startswith("sqlite"):
            # Its own file: result writes then never wait on the ledger's write lock.
            return f"db+sqlite:///{self.var_dir / 'results.db'}"
        return "db+" + self.database_url


def load_settings() -> Settings:
    """Read the settings from the environment; ``NAME_FILE`` stands in for a secret ``NAME``."""
    from_files: dict[str, Any] = {}
    for name in _FILE_SETTINGS:
        file_name = os.environ.get(name + "_FILE")
        if name not in os.environ and file_name:
            from_files[name.lower()] = _read_secret_file(file_name, name)
    try:
        return Settings(**from_files)
    except ValidationError as e:
        raise ConfigError("invalid settings: " + _describe(e, prefix="")) from None


@functools.cache
def get_settings() -> Settings:
    return load_settings()


# --------------------------------------------------------------------------------------------
# Services file
# --------------------------------------------------------------------------------------------

_RATE_RE = re.compile(r"^\d+(\.\d+)?/[smh]$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "list": list[Any],
    "dict": dict[str, Any],
    "any": Any,
}
_METHODS = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoAuth(_Strict):
    type: Literal["none"] = "none"


class BearerAuth(_Strict):
    type: Literal["bearer"]
    token: SecretStr = Field(min_length=1)


class ApiKeyAuth(_Strict):
    type: Literal["api_key"]
    key: SecretStr = Field(min_length=1)
    name: str = Field("X-API-Key", min_length=1)
    location: Literal["header", "query"] = Field("header", alias="in")


class BasicAuth(_Strict):
    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretStr


Auth = Annotated[NoAuth | BearerAuth | ApiKeyAuth | BasicAuth, Field(discriminator="type")]


class RetryPolicy(_Strict):
    """Celery's own retry options, per service: ``retry_backoff`` is ``backoff`` seconds doubled
    on each retry, capped at ``backoff_max``, with full jitter when ``jitter`` is set."""

    max_retries: int = Field(5, ge=0, le=100)
    backoff: int = Field(2, ge=1, le=3600)
    backoff_max: int = Field(300, ge=1)
    jitter: bool = True
    #: The longest ``Retry-After`` honoured as given; longer waits are cut to this.
    retry_after_max: int = Field(300, ge=1)


class Breaker(_Strict):
    """Open after ``threshold`` consecutive failures; probe again after ``reset_timeout`` s."""

    threshold: int = Field(5, ge=1, le=1000)
    reset_timeout: float = Field(30, gt=0, le=3600)


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int


def _parse_type(spec: str) -> tuple[Any, bool]:
    """``"str | None"`` -> ``(str, optional=True)``."""
    parts = [p.strip() for p in spec.split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    if not names or any(n not in _TYPES for n in names):
        raise ValueError(f"unknown type {spec!r}; use one of {', '.join(_TYPES)}, optionally '| None'")
    tp: Any = _TYPES[names[0]]
    for n in names[1:]:
        tp = tp | _TYPES[n]
    return tp, optional


class Operation(_Strict):
    """One call a service offers. Path parameters come from ``{name}`` in ``path`` (strings);
    ``query`` and ``body`` map parameter names to types."""

    method: _METHODS = "GET"
    path: str = Field(pattern=r"^/")
    query: dict[str, str] = Field(default_factory=dict)
    body: dict[str, str] | None = None

    _model: type[BaseModel] = PrivateAttr()

    @property
    def path_params(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.path) if f]

    @model_validator(mode="after")
    def _build_params_model(self) -> Operation:
        fields: dict[str, Any] = {}
        for name in self.path_params:
            if not name.isidentifier():
                raise ValueError(f"path parameter {{{name}}} is not a valid name")
            fields[name] = (str, Field(min_length=1))
        for where, specs in (("query", self.query), ("body", self.body or {})):
            for name, spec in specs.items():
                if name in fields:
                    raise ValueError(f"parameter {name!r} is declared twice ({where})")
                tp, optional = _parse_type(spec)
                fields[name] = (tp | None, None) if optional else (tp, ...)
        self._model = create_model("Params", __config__=ConfigDict(extra="forbid"), **fields)
        return self

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Return the params checked and coerced; raise :class:`InvalidParams` naming each problem."""
        try:
            return self._model.model_validate(params).model_dump(exclude_none=True)
        except ValidationError as e:
            raise InvalidParams(_describe(e, prefix="")) from None


class HealthCheck(_Strict):
    """How beat checks a service: one of its ``operation``s (with ``params``) or a GET of
    ``path``, every ``interval`` seconds. A 2xx answer is healthy."""

    operation: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    path: str | None = Field(None, pattern=r"^/")
    interval: float = Field(60, ge=1, le=86400)
    enabled: bool = True

    @model_validator(mode="after")
    def _one_target(self) -> HealthCheck:
        if (self.operation is None) == (self.path is None):
            raise ValueError("set exactly one of operation or path")
        if self.params and self.operation is None:
            raise ValueError("params go with an operation")
        return self


class ServiceConfig(_Strict):
    name: str
    kind: Literal["rest", "github"] = "rest"
    base_url: str = Field(pattern=r"^https?://[^/]+")
    auth: Auth = NoAuth()
    timeout: float = Field(10, gt=0, le=300)
    #: Calls per second, minute or hour ("20/s", "5000/h"): a global limit shared by every
    #: worker through Redis, and Celery's per-worker rate_limit annotation.
    rate_limit: str | None = None
    #: Calls that may go at once before the rate applies.
    burst: int = Field(1, ge=1, le=10000)
    #: The same, for each agent (``call_service.delay(..., agent="name")``) on its own, so one
    #: busy agent cannot take the whole service's budget.
    agent_rate_limit: str | None = None
    agent_burst: int = Field(1, ge=1, le=10000)
    retry: RetryPolicy = RetryPolicy()
    breaker: Breaker | None = Breaker()
    #: Allow requests to loopback, private and link-local addresses (off: an SSRF guard).
    allow_private_network: bool = False
    #: Non-public networks this service may reach all the same (CIDRs), when
    #: ``allow_private_network`` is off.
    allowed_networks: tuple[IPvAnyNetwork, ...] = ()
    headers: dict[str, str] = Field(default_factory=dict)
    #: A CA bundle to trust instead of the system's (a service behind a private CA).
    ca_bundle: Path | None = None
    operations: dict[str, Operation] = Field(min_length=1)
    health: HealthCheck | None = None

    @model_validator(mode="after")
    def _health_operation(self) -> ServiceConfig:
        h = self.health
        if h is not None and h.operation is not None:
            op = self.operations.get(h.operation)
            if op is None:
                raise ValueError(f"health.operation: no operation {h.operation!r} in operations")
            try:
                op.validate_params(h.params)
            except InvalidParams as e:
                raise ValueError(f"health.params: {e}") from None
        return self

    @field_validator("rate_limit", "agent_rate_limit")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None and not _RATE_RE.match(v):
            raise ValueError("must look like 10/s, 100/m or 5000/h")
        return v

    @property
    def global_limit(self) -> Rate | None:
        return _rate(self.rate_limit, self.burst)

    @property
    def agent_limit(self) -> Rate | None:
        return _rate(self.agent_rate_limit, self.agent_burst)

    @field_validator("ca_bundle")
    @classmethod
    def _ca_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("no such file")
        return v

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")


class WebhookSource(_Strict):
    """A sender of webhooks, received at ``POST /webhooks/{name}``.

    While a secret is being rotated, put the old one in ``previous_secret``: a delivery signed
    with either is accepted. Standard Webhooks secrets are ``whsec_`` followed by base64, and
    ``secret`` may also list several of them separated by spaces.
    """

    name: str
    type: Literal["github", "slack", "standard"]
    secret: SecretStr = Field(min_length=1)
    previous_secret: SecretStr | None = None

    @property
    def secrets(self) -> list[bytes]:
        """The signing keys, as bytes (``whsec_`` secrets decoded)."""
        given = [s.get_secret_value().strip() for s in (self.secret, self.previous_secret) if s is not None]
        if self.type == "standard":
            return [base64.b64decode(p.removeprefix("whsec_")) for v in given for p in v.split()]
        return [v.encode() for v in given if v]

    @field_validator("secret", "previous_secret")
    @classmethod
    def _secret_form(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # An empty key is one every sender can sign with: refuse it, whatever left it empty.
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("must not be empty")
        if v is not None and info.data.get("type") == "standard":
            for part in v.get_secret_value().split():
                try:
                    if not part.startswith("whsec_") or not base64.b64decode(part[6:], validate=True):
                        raise ValueError
                except (ValueError, binascii.Error):
                    raise ValueError("Standard Webhooks secrets look like whsec_<base64>") from None
        return v


class Mailbox(_Strict):
    """An IMAP mailbox beat polls every ``interval`` seconds for new messages.

    TLS (IMAPS, port 993) unless ``tls: false``, which is only allowed for a loopback host.
    """

    name: str
    host: str = Field(min_length=1)
    port: int = Field(993, ge=1, le=65535)
    tls: bool = True
    username: str = Field(min_length=1)
    password: SecretStr
    folder: str = Field("INBOX", min_length=1)
    interval: float = Field(60, ge=1, le=86400)
    timeout: float = Field(30, gt=0, le=300)
    enabled: bool = True
    #: The first poll dispatches the messages already in the folder; with ``false`` it only
    #: notes where the folder ends, and only mail arriving after it is dispatched.
    read_existing: bool = True

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> Mailbox:
        if not self.tls and not _is_loopback(self.host):
            raise ValueError("tls: plain IMAP is allowed only on a loopback host")
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _rate(spec: str | None, burst: int) -> Rate | None:
    if spec is None:
        return None
    count, unit = spec.split("/")
    per_second = float(count) / {"s": 1, "m": 60, "h": 3600}[unit]
    return Rate(per_second, burst) if per_second > 0 else None


def _read_services_file(path: Path) -> dict[str, Any]:
    """The services file as a mapping, ``${VAR}`` references still unexpanded."""
    try:
        text = path.read_text()
        # ${...} is not valid inside a YAML flow mapping ({token: ${X}}); stand a plain word in
        # for each reference while parsing, so values never go through the YAML parser either.
        refs: list[str] = []

        def placeholder(m: re.Match[str]) -> str:
            refs.append(m.group(0))
            return f"__ENV_REF_{len(refs) - 1}__"

        raw = _restore_refs(yaml.safe_load(_ENV_REF.sub(placeholder, text)), refs)
    except OSError as e:
        raise ConfigError(f"services file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"services file {path}: not valid YAML{where}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise ConfigError(f"services file {path}: expected a mapping with a 'services' key")
    for section in ("webhooks", "mailboxes"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"services file {path}: '{section}' must be a mapping")
    return raw


_M = TypeVar("_M", bound=BaseModel)


def _entries(raw: dict[str, Any], section: str, model: type[_M]) -> dict[str, _M]:
    """Validate each ``name: {...}`` entry of a section of the services file as ``model``."""
    out: dict[str, _M] = {}
    for name, spec in (raw.get(section) or {}).items():
        where = f"{section}.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
            raise ConfigError(f"{where}: names are lower-case letters, digits and '_', at most 63")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        try:
            out[name] = model.model_validate({**_interpolate(spec, where), "name": name})
        except ValidationError as e:
            raise ConfigError(_describe(e, prefix=where + ".")) from None
    return out


def load_services(path: Path, settings: Settings | None = None) -> dict[str, ServiceConfig]:
    """Read and validate the services file. Raises :class:`ConfigError` naming service and field."""
    settings = settings or get_settings()
    services = _entries(_read_services_file(path), "services", ServiceConfig)
    for name, svc in services.items():
        where = f"services.{name}"
        if svc.retry.backoff_max > settings.max_countdown:
            raise ConfigError(f"{where}.retry.backoff_max: must be at most MAX_COUNTDOWN")
        if svc.retry.retry_after_max > settings.max_countdown:
            raise ConfigError(f"{where}.retry.retry_after_max: must be at most MAX_COUNTDOWN")
    return services


def load_webhooks(path: Path) -> dict[str, WebhookSource]:
    """The incoming webhook sources of the services file (its ``webhooks:`` section)."""
    return _entries(_read_services_file(path), "webhooks", WebhookSource)


def load_mailboxes(path: Path) -> dict[str, Mailbox]:
    """The IMAP mailboxes beat polls (the ``mailboxes:`` section of the services file)."""
    return _entries(_read_services_file(path), "mailboxes", Mailbox)


@functools.cache
def get_webhooks() -> dict[str, WebhookSource]:
    return load_webhooks(get_settings().services_file)


@functools.cache
def get_mailboxes() -> dict[str, Mailbox]:
    return load_mailboxes(get_settings().services_file)


@functools.cache
def get_services() -> dict[str, ServiceConfig]:
    settings = get_settings()
    return load_services(settings.services_file, settings)


_PLACEHOLDER = re.compile(r"__ENV_REF_(\d+)__")


def _restore_refs(node: Any, refs: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _restore_refs(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_restore_refs(v, refs) for v in node]
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: refs[int(m.group(1))], node)
    return node


def _interpolate(node: Any, where: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; ``VAR_FILE`` stands in for ``VAR``."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if os.environ.get(name + "_FILE"):
            return _read_secret_file(os.environ[name + "_FILE"], name)
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (nor {name}_FILE)")

    return _ENV_REF.sub(sub, node)


def _read_secret_file(file_name: str, name: str) -> str:
    try:
        return Path(file_name).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{name}_FILE: cannot read {file_name} ({e.strerror})") from None


def _describe(e: ValidationError, prefix: str) -> str:
    """Name every failing field and why, without the value that was given."""
    parts = []
    for err in e.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('.')}: {msg}")
    return "; ".join(parts)
