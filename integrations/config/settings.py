"""The process's settings, from the environment. Defaults are the embedded ones: no Redis, no
Postgres; every error names the setting, never its value."""

from __future__ import annotations

import datetime as dt
import functools
import os
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from integrations import redact
from integrations.config.durations import parse_duration
from integrations.config.schema import check_url
from integrations.config.secrets import read_secret_file
from integrations.errors import ConfigError

#: Settings that may hold a secret can also be read from a file named by ``NAME_FILE``.
FILE_SETTINGS = (
    "BROKER_URL",
    "RESULT_BACKEND",
    "DATABASE_URL",
    "FLOWER_PASSWORD",
    "COORDINATION_URL",
    "INTEGRATIONS_KEYS",
)


def _duration(v: Any) -> Any:
    """``LEDGER_RETENTION=30d``: an operator's span of time; empty means none."""
    if isinstance(v, str):
        return parse_duration(v) if v.strip() else None
    return v


class Settings(BaseSettings):
    """The process's settings. Defaults are the embedded ones: no Redis, no Postgres."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    broker_url: str = "filesystem://localhost/"
    result_backend: str | None = None
    #: Defaults to SQLite under ``VAR_DIR``.
    database_url: str = ""
    services_file: Path = Path("services.yaml")
    var_dir: Path = Path("var")

    ledger_body_max_bytes: int = Field(4096, ge=0, le=1_000_000)
    response_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    #: A job's parameters, as JSON, may be this large at most (they are stored in the ledger).
    params_max_bytes: int = Field(256 * 1024, ge=1024, le=64 * 1024 * 1024)

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
    #: (running jobs: this long and past the task's hard time limit; waiting ones: this long
    #: and past the longest countdown). Jobs of a lost worker node come back much sooner.
    stuck_after: int = Field(900, ge=5)
    #: How often beat's sweepers look for jobs, events and handlings whose message was lost,
    #: and for the jobs of worker nodes that stopped beating.
    sweep_interval: float = Field(15, ge=1, le=3600)
    #: Every worker node writes a heartbeat to the coordination Redis this often (seconds)...
    node_heartbeat: float = Field(5, ge=0.5, le=60)
    #: ...and is lost once none came for this long: its jobs are published again by the sweeper.
    node_lost_after: float = Field(20, ge=3, le=3600)
    #: RabbitMQ only: the broker's ``consumer_timeout`` (rabbitmq.conf; RabbitMQ's default, 30
    #: minutes). A message stays unacknowledged in a worker for at most
    #: (WORKER_PREFETCH_MULTIPLIER + 1) x TASK_TIME_LIMIT, which must stay below it.
    consumer_timeout: float = Field(1800, ge=60)
    #: How long a worker keeps retrying a ledger write, with backoff, while the database is
    #: unreachable, so no outcome of a call already made is lost to a database restart.
    ledger_retry_for: float = Field(300, ge=0)
    #: How long ``integrations migrate`` waits for the database to accept connections (a
    #: container started beside it, a restart) before it fails.
    migrate_wait: float = Field(60, ge=0, le=3600)
    #: Finished jobs, events, deliveries (and what hangs on them) older than this (``30d``) are
    #: pruned by beat every hour; unset, the ledger keeps everything (``integrations prune``).
    ledger_retention: Annotated[dt.timedelta | None, BeforeValidator(_duration)] = None

    #: The level every process logs at (``make run``, worker, beat, receiver).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    #: Task events feed Flower (operators watch the workers there); TASK_EVENTS=false saves
    #: their cost where nobody watches.
    task_events: bool = True

    #: The Redis that workers share for global rate limits, pauses and breakers. Defaults to
    #: a Redis broker; empty on the embedded defaults (then there is nothing to share).
    coordination_url: str | None = None
    #: How late (seconds) a call may reach its upstream after the limiter granted it (worker
    #: scheduling, a countdown's timer). Grants are planned so that calls this late still keep
    #: within burst + rate in every window; a kept slot reached later takes a new one.
    rate_limit_margin: float = Field(0.2, ge=0, le=5)
    #: A deferral (rate limit, open breaker, pause) up to this long is a broker countdown;
    #: a longer one is parked in the ledger and re-queued by beat's dispatcher.
    defer_countdown_max: int = Field(30, ge=1)

    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    #: Where the webhook receiver listens (``integrations receiver``, started by ``make run``).
    receiver_host: str = "127.0.0.1"
    receiver_port: int = Field(8000, ge=1, le=65535)
    #: Receiver processes (uvicorn workers) sharing the port: one per core the receiver may use.
    receiver_workers: int = Field(1, ge=1, le=64)
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

    #: The MCP server over Streamable HTTP (``integrations mcp --http``) listens here.
    mcp_host: str = "127.0.0.1"
    mcp_port: int = Field(8765, ge=1, le=65535)
    #: How long a ``tools/call`` waits for its job before answering with the job id and status
    #: (ask again with the ``job_status`` tool).
    mcp_wait: float = Field(30, ge=0, le=600)
    #: The keys that encrypt connections' tokens in the ledger (Fernet keys, comma-separated,
    #: newest first: the first encrypts, all decrypt). ``integrations keys generate`` makes one.
    integrations_keys: SecretStr | None = None
    #: Where providers send the user back after authorizing a connection: the receiver's
    #: ``/oauth/callback`` as the browser reaches it (default: on RECEIVER_HOST:RECEIVER_PORT).
    oauth_redirect_url: str | None = None

    #: Bearer tokens of the HTTP transport: lines of ``<sha256 of the token, hex> <agent>``
    #: (``integrations mcp-token AGENT`` adds one). Tokens themselves are never stored.
    mcp_tokens_file: Path | None = None
    #: Browser origins allowed to call the HTTP transport besides loopback ones, comma-separated
    #: (``https://app.example.com``); any other ``Origin`` is refused (DNS-rebinding protection).
    mcp_allowed_origins: str = ""
    #: ``Host`` values the HTTP transport answers besides ``MCP_HOST`` and loopback, comma-separated.
    mcp_allowed_hosts: str = ""

    # --- Observability (issue 15): metrics, logs, traces ---
    #: ``json``: one JSON object per log line (every process: worker, beat, receiver, CLI,
    #: exporter); ``text``: readable lines.
    log_format: Literal["text", "json"] = "text"
    #: Where ``integrations metrics`` (the exporter beside the workers) serves ``/metrics``.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9808, ge=1, le=65535)
    #: The exporter reads the ledger, the breakers and the broker at most this often.
    metrics_cache_seconds: float = Field(5, ge=0, le=300)
    #: Give job counters an ``agent`` label. Off by default: agents may be many.
    metrics_agent_labels: bool = False
    #: Where processes keep their metrics for the exporter (prometheus_client's multiprocess
    #: files). Default: ``VAR_DIR/metrics``, made owner-only.
    prometheus_multiproc_dir: Path | None = None
    #: OTLP export of traces when set (the OpenTelemetry SDK reads the rest of ``OTEL_*``).
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None

    @field_validator("oauth_redirect_url")
    @classmethod
    def _redirect_url(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v, what="OAUTH_REDIRECT_URL")

    @property
    def redirect_url(self) -> str:
        """The OAuth redirect URI: OAUTH_REDIRECT_URL, else the receiver's callback."""
        return self.oauth_redirect_url or f"http://{self.receiver_host}:{self.receiver_port}/oauth/callback"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

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
        if self.node_lost_after < 3 * self.node_heartbeat:
            raise ValueError("NODE_LOST_AFTER must be at least three NODE_HEARTBEAT intervals")
        if self.is_amqp:
            self._check_rabbitmq()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'integrations.db'}"
        if self.coordination_url is None and self.broker_url.startswith(("redis://", "rediss://")):
            self.coordination_url = self.broker_url
        _ = self.retry_schedule, self.allowed_networks  # fail at start-up, not at the first delivery
        for url in (self.broker_url, self.result_backend, self.database_url, self.coordination_url):
            redact.register(_password_of(url))
        if self.flower_password is not None:
            redact.register(self.flower_password.get_secret_value())
        if self.integrations_keys is not None:
            keys = self.integrations_keys.get_secret_value()
            redact.register(keys, *(k.strip() for k in keys.split(",")))
        return self

    def _check_rabbitmq(self) -> None:
        if self.coordination_url is None:
            # Unset, not empty: a Redis broker used to provide it, RabbitMQ does not.
            raise ValueError(
                "BROKER_URL is RabbitMQ: set COORDINATION_URL to a Redis (global rate limits, pauses,"
                " breakers, worker liveness and task results live there), or to an empty value to"
                " run without"
            )
        held = (self.worker_prefetch_multiplier + 1) * self.task_time_limit
        if held >= self.consumer_timeout:
            raise ValueError(
                "(WORKER_PREFETCH_MULTIPLIER + 1) x TASK_TIME_LIMIT must stay below CONSUMER_TIMEOUT"
                " (RabbitMQ's consumer_timeout): a prefetched message is held unacknowledged that long"
            )

    @property
    def is_amqp(self) -> bool:
        """The broker is RabbitMQ (AMQP 0-9-1, py-amqp)."""
        return self.broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))

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
    def metrics_dir(self) -> Path:
        return self.prometheus_multiproc_dir or self.var_dir / "metrics"

    @property
    def tracing_configured(self) -> bool:
        return bool(self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def results_url(self) -> str:
        """Where task results go: ``RESULT_BACKEND``, else Redis beside a Redis broker, else the
        coordination Redis beside RabbitMQ, else the DB."""
        if self.result_backend:
            return self.result_backend
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        if self.is_amqp and self.coordination_url:
            return self.coordination_url
        if self.is_sqlite:
            # Its own file: result writes then never wait on the ledger's write lock.
            return f"db+sqlite:///{self.var_dir / 'results.db'}"
        return "db+" + self.database_url


def private_dir(path: Path, tighten: bool = False) -> Path:
    """``path`` as a directory only its owner may enter, made so when missing. ``tighten`` also
    takes an existing one back to 0700: for ``VAR_DIR`` alone, which is ours by definition (the
    embedded ledger, broker and beat files live there) — never a directory a file merely sits
    in, such as ``/tmp``."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if tighten and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner may read, created empty when missing (SQLite then
    gives its -wal and -shm files the same mode). Its directory is made when missing, never
    changed."""
    if not path.parent.exists():
        private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    elif path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def _password_of(url: str | None) -> str | None:
    try:
        return urlsplit(url).password if url else None
    except ValueError:
        return None


def load_settings() -> Settings:
    """Read the settings from the environment; ``NAME_FILE`` stands in for a secret ``NAME``."""
    from_files: dict[str, Any] = {}
    for name in FILE_SETTINGS:
        file_name = os.environ.get(name + "_FILE")
        if name not in os.environ and file_name:
            from_files[name.lower()] = read_secret_file(file_name, name)
    try:
        return Settings(**from_files)
    except ValidationError as e:
        from integrations.config.loading import describe

        problems = describe(e, prefix="").split("; ")
        raise ConfigError("invalid settings: " + "; ".join(map(_as_set, problems))) from None


def _as_set(problem: str) -> str:
    """``receiver_port: ...`` as ``RECEIVER_PORT: ...``, the name the operator set; a problem
    of the settings as a whole without the empty name before it."""
    field, sep, rest = problem.partition(": ")
    if not sep:
        return problem
    if not field:
        return rest
    return f"{field.upper()}: {rest}" if field.islower() else problem


@functools.cache
def get_settings() -> Settings:
    return load_settings()
