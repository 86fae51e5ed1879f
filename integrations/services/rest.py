"""Generic REST: operations declared in the services file as a method and a path template, with
query and JSON body parameters; the request is the template filled from validated params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote, unquote

from pydantic import Field, field_validator

from integrations import http
from integrations.errors import InvalidParams
from integrations.services import params as P
from integrations.services.base import PLACEHOLDER, Attempt, Operation
from integrations.services.http_service import HttpService

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
#: A parameter in the services file: a short type (``"int | None"``) or a JSON Schema.
ParamSpec = str | dict[str, Any]


class RestOperation(Operation):
    """``{method, path, query, body, description}``. Path parameters are the template's ``{name}``
    placeholders (strings, each quoted whole into one path segment)."""

    method: Method = "GET"
    path: str = Field(pattern=r"^/")
    query: dict[str, ParamSpec] = Field(default_factory=dict)
    body: dict[str, ParamSpec] | None = None

    @field_validator("path")
    @classmethod
    def _plain_placeholders(cls, v: str) -> str:
        if "{" in PLACEHOLDER.sub("", v) or "}" in PLACEHOLDER.sub("", v):
            raise ValueError("path may hold plain {name} placeholders only")
        if any(c.isspace() or c in "?#" for c in v):
            raise ValueError("path must not contain whitespace, '?' or '#' (put query parameters in query:)")
        return v

    @property
    def path_params(self) -> list[str]:
        return PLACEHOLDER.findall(self.path)

    def build_parameters(self) -> dict[str, Any]:
        props: dict[str, dict[str, Any]] = {}
        required: list[str] = []
        for name in self.path_params:
            props[name] = {"type": "string", "minLength": 1}
            required.append(name)
        for where, specs in (("query", self.query), ("body", self.body or {})):
            for name, spec in specs.items():
                if name in props:
                    raise ValueError(f"{where}: a parameter is declared twice")
                schema, needed = P.field(spec)
                props[name] = schema
                if needed:
                    required.append(name)
        return P.object_schema(props, required, self.description)

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        for name in self.path_params:
            if _dot_segment(str(clean[name])):
                raise InvalidParams(f"{name}: must not be '.' or '..' (a path parameter names one segment)")
        return clean


def _dot_segment(value: str) -> bool:
    """Whether ``value`` is ``.`` or ``..``, however often percent-encoded."""
    for _ in range(4):
        if value in (".", ".."):
            return True
        decoded = unquote(value)
        if decoded == value:
            return False
        value = decoded
    return True  # encoded more deeply than anyone means


class RestService(HttpService):
    kind: Literal["rest"] = "rest"
    operations: dict[str, RestOperation] = Field(min_length=1)

    def catalog(self) -> Mapping[str, RestOperation]:
        return self.operations

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        assert isinstance(op, RestOperation)
        path = PLACEHOLDER.sub(lambda m: quote(str(params[m.group(1)]), safe=""), op.path)
        query = {k: params[k] for k in op.query if k in params}
        body = {k: params[k] for k in op.body if k in params} if op.body is not None else None
        return http.Request(op.method, self.base_url + path, params=query, json=body)

    def describe_operation(self, name: str, op: Operation) -> str:
        assert isinstance(op, RestOperation)
        return f"{op.method} {op.path}"
