"""SQL databases an agent may query: statements declared in the services file, never written by
an agent, each run with its parameters bound (``sqlalchemy.text``), never formatted in.

::

    customers_db:
      kind: sql
      url: ${CUSTOMERS_DB_URL}          # postgresql://, mysql:// or mariadb://, sqlite:///
      timeout: 5                        # the statement timeout, seconds
      max_rows: 1000
      statements:
        find_customer:
          description: A customer by e-mail address.
          sql: select id, name from customers where email = :email
          params: {email: str}
        rename_customer:
          sql: update customers set name = :name where id = :id
          params: {id: int, name: str}
          mode: write

A statement is ``mode: read`` unless it says ``write``: a read runs in a read-only transaction,
so a statement that writes fails there. The database side (engines, the SSRF guard, timeouts,
error classification, JSON values) lives in :mod:`integrations.services.sqldb`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from sqlalchemy import CursorResult, text
from sqlalchemy.engine import URL

from integrations import redact
from integrations.config import get_settings
from integrations.config.schema import RequiredSecret
from integrations.config.secrets import Secret
from integrations.errors import PermanentError
from integrations.services import params as P
from integrations.services import sqldb, sqlerrors
from integrations.services.base import Attempt, Operation, Outcome, Service

#: A parameter in the services file: a short type (``"int | None"``) or a JSON Schema.
ParamSpec = str | dict[str, Any]


def bind_names(sql: str) -> set[str]:
    """The ``:name`` bind parameters of ``sql`` as SQLAlchemy reads them (``\\:`` escapes one)."""
    return set(text(sql).compile().params)


class Statement(Operation):
    """``{sql, params, mode, description}``: one statement, one operation."""

    sql: str = Field(min_length=1)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    #: ``read`` runs in a read-only transaction; a statement that writes says ``write``.
    mode: Literal["read", "write"] = "read"

    @model_validator(mode="after")
    def _binds_match(self) -> Statement:
        binds, declared = bind_names(self.sql), set(self.params)
        if binds - declared:
            names = ", ".join(f":{n}" for n in sorted(binds - declared))
            raise ValueError(f"sql uses {names}, not declared in params")
        if declared - binds:
            raise ValueError(f"params: {', '.join(sorted(declared - binds))} not used in sql")
        return self

    def build_parameters(self) -> dict[str, Any]:
        props: dict[str, dict[str, Any]] = {}
        required: list[str] = []
        for name, spec in self.params.items():
            props[name], needed = P.field(spec)
            if needed:
                required.append(name)
        about = self.description or f"Runs this {self.mode} statement: {' '.join(self.sql.split())}"
        return P.object_schema(props, required, about)


class SqlService(Service):
    kind: Literal["sql"] = "sql"
    health_own_check: ClassVar[bool] = True

    #: ``postgresql://user:${DB_PASSWORD}@host/db`` or all of it from ``${DB_URL}``: a secret.
    url: RequiredSecret
    statements: dict[str, Statement] = Field(min_length=1)
    #: Rows returned at most; a statement that has more reports ``truncated``.
    max_rows: int = Field(1000, ge=1, le=100_000)
    connect_timeout: float = Field(5, gt=0, le=60)
    #: Connections kept per worker process (and as many more under load).
    pool_size: int = Field(5, ge=1, le=50)
    #: Allow loopback, private and link-local database hosts (off: the SSRF guard).
    allow_private_network: bool = False
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()

    @field_validator("url")
    @classmethod
    def _url_form(cls, v: Secret) -> Secret:
        if v.available:
            sqldb.parse_url(v.get())
            redact.register(url_password(v))
        return v

    # ---- the contract ------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, Statement]:
        return self.statements

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        assert isinstance(op, Statement)
        return self.run(op.sql, {name: params.get(name) for name in op.params}, op.mode)

    def check_health(self) -> Outcome:
        """``select 1`` in a read-only transaction, unless ``health`` names a statement."""
        if self.health is not None and self.health.operation is not None:
            return super().check_health()
        return self.run("select 1 as ok", {}, "read")

    def secret_values(self) -> list[str]:
        password = url_password(self.url) if self.url.available else None
        return [*super().secret_values(), *([password] if password else [])]

    def database_url(self) -> URL:
        """The URL to connect to (raises :class:`ConfigError` when its variable is unset)."""
        return sqldb.parse_url(self.url.get())

    # ---- one statement -----------------------------------------------------------------------

    def run(self, sql: str, values: dict[str, Any], mode: str) -> Outcome:
        """Run ``sql`` with ``values`` bound, in a transaction of ``mode``; one attempt."""
        t0 = time.perf_counter()
        try:
            engine = sqldb.engine_for(self)
            bound = {k: _bindable(v, engine.dialect.name) for k, v in values.items()}
            with engine.connect() as conn, sqldb.transaction(conn, mode == "read", self.timeout):
                result = conn.execute(text(sql), bound)
                data, meta = self._collect(result, mode == "write")
        except Exception as e:
            err = sqlerrors.classify(e, self.timeout, self.secret_values(), values.values())
            if err is None:
                raise
            err.latency_ms = (time.perf_counter() - t0) * 1000
            err.excerpt = self._bounded(err.excerpt)
            raise err from None
        latency_ms = (time.perf_counter() - t0) * 1000
        excerpt = self._bounded(json.dumps(data, separators=(",", ":"), ensure_ascii=False))
        return Outcome(data=data, latency_ms=latency_ms, excerpt=excerpt, meta=meta)

    def _collect(self, result: CursorResult[Any], write: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """The rows (at most ``max_rows``, and at most ``RESPONSE_MAX_BYTES`` of JSON) and the
        number of rows a write changed; the meta that goes on the job."""
        data: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        if result.returns_rows:
            columns = list(result.keys())
            if len(set(columns)) < len(columns):
                raise PermanentError("the statement returns two columns of one name; give them aliases")
            budget = get_settings().response_max_bytes
            rows: list[dict[str, Any]] = []
            truncated: str | None = None
            for raw in result.fetchmany(self.max_rows + 1):
                if len(rows) == self.max_rows:
                    truncated = "max_rows"
                    break
                row = {c: sqldb.json_value(v) for c, v in zip(columns, raw, strict=True)}
                budget -= len(json.dumps(row, separators=(",", ":")).encode())
                if budget < 0:
                    truncated = "response_max_bytes"
                    break
                rows.append(row)
            data.update(columns=columns, rows=rows, truncated=truncated is not None)
            meta["rows"] = len(rows)
            if truncated:
                meta.update(truncated=True, truncated_by=truncated)
        if write and result.rowcount >= 0:
            data["rows_affected"] = meta["rows_affected"] = result.rowcount
        result.close()
        return data, meta

    def _bounded(self, text_: str | None) -> str | None:
        if not text_:
            return None
        limit = get_settings().ledger_body_max_bytes
        scrubbed = redact.scrub(text_.encode(), self.secret_values())
        return scrubbed[:limit].decode(errors="ignore") or None

    # ---- shown by `integrations services` ----------------------------------------------------

    def describe(self) -> str:
        backend = self.database_url().get_backend_name() if self.url.available else "url not set here"
        writes = sum(1 for s in self.statements.values() if s.mode == "write")
        return f"sql, {backend}, {writes} writing, timeout {self.timeout:g}s, at most {self.max_rows} rows"

    def describe_operation(self, name: str, op: Operation) -> str:
        assert isinstance(op, Statement)
        about = op.description.splitlines()[0] if op.description else " ".join(op.sql.split())
        return f"{op.mode}: {about[:100]}"


def url_password(secret: Secret) -> str | None:
    """The password inside the URL, if it has one (a credential of its own to mask)."""
    try:
        return sqldb.parse_url(secret.get()).password
    except ValueError:
        return None


def _bindable(value: Any, backend: str) -> Any:
    """A JSON mapping is bound as JSON text (cast it in SQL: ``:doc::jsonb``); lists as the
    driver binds them (Postgres arrays, MariaDB ``in :ids``), as JSON text on SQLite."""
    if isinstance(value, dict) or (isinstance(value, list) and backend == "sqlite"):
        return json.dumps(value)
    return value
