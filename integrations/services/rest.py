"""Generic REST: operations declared in the services file as a method and a path template, with
path, query and header parameters and a JSON or form body; the request is the template filled
from validated params.

Each parameter is a short type (``str``, ``int | None``) or a whole JSON Schema, so operations
(imported from an OpenAPI document, say) validate nested bodies, arrays and enums exactly.
Query parameters are serialised as OpenAPI's ``style`` and ``explode`` say, for the common
styles (form, spaceDelimited, pipeDelimited, deepObject):
https://spec.openapis.org/oas/v3.1.0#style-values
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import quote, unquote, urlencode

from pydantic import Field, field_validator, model_validator
from urllib3 import encode_multipart_formdata

from integrations import http
from integrations.errors import InvalidParams
from integrations.services import params as P
from integrations.services.base import PLACEHOLDER, Attempt, Operation
from integrations.services.http_service import HttpService

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
ContentType = Literal["application/json", "application/x-www-form-urlencoded", "multipart/form-data"]
#: A parameter in the services file: a short type (``"int | None"``) or a JSON Schema.
ParamSpec = str | dict[str, Any]
#: The parameter holding the whole body when the operation has ``body_schema:``.
BODY = "body"
STYLES = ("form", "spaceDelimited", "pipeDelimited", "deepObject")
#: RFC 9110 5.6.2: a header name is a token.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True)
class Wire:
    """Where a query or header parameter goes: ``key`` in params, ``name`` on the wire."""

    key: str
    name: str
    style: str = "form"
    explode: bool = True


class RestOperation(Operation):
    """``{method, path, path_params, query, headers, body | body_schema, content_type, description}``.

    Path parameters are the template's ``{name}`` placeholders, strings unless ``path_params``
    gives their schema; each value is quoted whole into one segment. A query or header
    parameter's spec may say its ``name`` on the wire (when it is not a valid key), and a query
    parameter its ``style`` and ``explode``. ``body`` names the top-level properties of an
    object body; ``body_schema`` is instead the whole body's schema, one parameter ``body``.
    ``defs`` become the params schema's ``$defs`` (recursive schemas refer to them).
    """

    method: Method = "GET"
    path: str = Field(pattern=r"^/")
    #: ``path_params:`` in the file: the placeholders' schemas (:attr:`path_params` lists their names).
    path_specs: dict[str, ParamSpec] = Field(default_factory=dict, alias="path_params")
    query: dict[str, ParamSpec] = Field(default_factory=dict)
    headers: dict[str, ParamSpec] = Field(default_factory=dict)
    body: dict[str, ParamSpec] | None = None
    body_schema: ParamSpec | None = None
    content_type: ContentType = "application/json"
    defs: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _plain_placeholders(cls, v: str) -> str:
        if "{" in PLACEHOLDER.sub("", v) or "}" in PLACEHOLDER.sub("", v):
            raise ValueError("path may hold plain {name} placeholders only")
        if any(c.isspace() or c in "?#" for c in v):
            raise ValueError("path must not contain whitespace, '?' or '#' (put query parameters in query:)")
        return v

    @model_validator(mode="after")
    def _one_body(self) -> RestOperation:
        if self.body is not None and self.body_schema is not None:
            raise ValueError("give body (named properties) or body_schema (the whole body), not both")
        return self

    @property
    def path_params(self) -> list[str]:
        """The names of the path's placeholders, in order."""
        return PLACEHOLDER.findall(self.path)

    def build_parameters(self) -> dict[str, Any]:
        props: dict[str, dict[str, Any]] = {}
        required: list[str] = []

        def add(where: str, name: str, schema: dict[str, Any], needed: bool) -> None:
            if name in props:
                raise ValueError(f"{where}: parameter {name!r} is declared twice")
            props[name] = schema
            if needed:
                required.append(name)

        placeholders = self.path_params
        for name in self.path_specs:
            if name not in placeholders:
                raise ValueError(f"path_params: {name!r} is not a placeholder of path")
        for name in placeholders:
            spec = self.path_specs.get(name)
            add(
                "path",
                name,
                P.field(spec)[0] if spec is not None else {"type": "string", "minLength": 1},
                True,
            )
        for name, spec in self.query.items():
            schema, needed, own = P.spec_of(spec, ("name", "style", "explode"))
            _check_wire(own, query=True)
            add("query", name, schema, needed)
        for name, spec in self.headers.items():
            schema, needed, own = P.spec_of(spec, ("name",))
            _check_wire(own, query=False)
            if not HEADER_NAME.fullmatch(str(own.get("name", name))):
                raise ValueError("headers: a header name is letters, digits and !#$%&'*+.^_`|~-")
            add("headers", name, schema, needed)
        for name, spec in (self.body or {}).items():
            add("body", name, *P.field(spec))
        if self.body_schema is not None:
            add("body_schema", BODY, *P.field(self.body_schema))
        schema = P.object_schema(props, required, self.description)
        if self.defs:
            schema["$defs"] = dict(self.defs)
        return schema

    def wires(self, where: Literal["query", "headers"]) -> list[Wire]:
        specs, own_keys = (
            (self.query, ("name", "style", "explode")) if where == "query" else (self.headers, ("name",))
        )
        out = []
        for key, spec in specs.items():
            own = {k: spec[k] for k in own_keys if k in spec} if isinstance(spec, dict) else {}
            style = own.get("style", "form")
            # OpenAPI's default: explode for form, not for the other styles.
            out.append(Wire(key, own.get("name", key), style, own.get("explode", style == "form")))
        return out

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        for name in self.path_params:
            if _dot_segment(text(clean[name])):
                raise InvalidParams(f"{name}: must not be or contain a '.' or '..' segment")
        for w in self.wires("headers"):
            if w.key in clean and any(c in text(clean[w.key]) for c in "\r\n\x00"):
                raise InvalidParams(f"{w.key}: a header value must not contain line breaks")
        if self.content_type != "application/json" and not isinstance(self.form_fields(clean), dict):
            raise InvalidParams(f"{BODY}: a form body must be a mapping")
        return clean

    def form_fields(self, params: Mapping[str, Any]) -> Any:
        if self.body_schema is not None:
            return params.get(BODY, {})
        return {k: params[k] for k in self.body or {} if k in params}


def _check_wire(own: dict[str, Any], *, query: bool) -> None:
    name = own.get("name")
    if name is not None and not (isinstance(name, str) and name):
        raise ValueError("name: must be a non-empty string")
    if query and own.get("style", "form") not in STYLES:
        raise ValueError(f"style: one of {', '.join(STYLES)}")
    if query and not isinstance(own.get("explode", True), bool):
        raise ValueError("explode: must be true or false")


def _dot_segment(value: str) -> bool:
    """Whether ``value`` is, or holds between slashes, a ``.`` or ``..`` segment, however often
    percent-encoded. The value is sent quoted whole (``%2F`` for ``/``), but a server or a proxy
    in front of it (nginx, Go's ServeMux, IIS with backslashes) may decode it and then resolve
    dot segments, leaving the base path."""
    for _ in range(4):
        if any(segment in (".", "..") for segment in re.split(r"[/\\]", value)):
            return True
        decoded = unquote(value)
        if decoded == value:
            return False
        value = decoded
    return True  # encoded more deeply than anyone means


def text(value: Any) -> str:
    """A value as OpenAPI's ``simple`` style writes it: ``true``, ``a,b``, ``k,v``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(text(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k},{text(v)}" for k, v in value.items())
    return str(value)


def query_pairs(w: Wire, value: Any) -> list[tuple[str, str]]:
    """``(name, value)`` pairs of one query parameter, as its style and explode say."""
    if isinstance(value, list):
        if w.explode or w.style == "deepObject":
            return [(w.name, text(v)) for v in value]
        sep = {"spaceDelimited": " ", "pipeDelimited": "|"}.get(w.style, ",")
        return [(w.name, sep.join(text(v) for v in value))]
    if isinstance(value, dict):
        if w.style == "deepObject":
            return [(f"{w.name}[{k}]", text(v)) for k, v in value.items()]
        if w.explode:
            return [(str(k), text(v)) for k, v in value.items()]
        return [(w.name, text(value))]
    return [(w.name, text(value))]


def _form_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else text(value)


def form_body(op: RestOperation, fields: Mapping[str, Any]) -> tuple[bytes, str]:
    """The body and its content type for a form operation."""
    if op.content_type == "application/x-www-form-urlencoded":
        pairs = [
            (k, _form_value(item)) for k, v in fields.items() for item in (v if isinstance(v, list) else [v])
        ]
        return urlencode(pairs).encode(), op.content_type
    props = _body_properties(op)
    parts: list[tuple[str, Any]] = []
    for k, v in fields.items():
        for item in v if isinstance(v, list) else [v]:
            if (props.get(k) or {}).get("contentEncoding") == "base64" and isinstance(item, str):
                try:
                    parts.append((k, (k, base64.b64decode(item, validate=True), "application/octet-stream")))
                except (binascii.Error, ValueError):
                    raise InvalidParams(f"{k}: must be base64") from None
            elif isinstance(item, dict | list):
                parts.append((k, (None, json.dumps(item), "application/json")))
            else:
                parts.append((k, _form_value(item)))
    return encode_multipart_formdata(parts)


def _body_properties(op: RestOperation) -> dict[str, Any]:
    props = op.parameters["properties"]
    if op.body_schema is not None:
        return dict(props[BODY].get("properties") or {})
    return {k: props[k] for k in op.body or {}}


class RestService(HttpService):
    kind: Literal["rest"] = "rest"
    operations: dict[str, RestOperation] = Field(min_length=1)

    def catalog(self) -> Mapping[str, RestOperation]:
        return self.operations

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        assert isinstance(op, RestOperation)
        path = PLACEHOLDER.sub(lambda m: quote(text(params[m.group(1)]), safe=""), op.path)
        query: dict[str, list[str]] = {}
        for w in op.wires("query"):
            if w.key in params:
                for name, value in query_pairs(w, params[w.key]):
                    query.setdefault(name, []).append(value)
        headers = {w.name: text(params[w.key]) for w in op.wires("headers") if w.key in params}
        req = http.Request(op.method, self.base_url + path, params=query, headers=headers)
        if op.content_type != "application/json":
            if (op.body is None and op.body_schema is None) or (
                op.body_schema is not None and BODY not in params
            ):
                return req  # no body to send
            content, content_type = form_body(op, op.form_fields(params))
            return replace(req, content=content, headers={**headers, "Content-Type": content_type})
        if op.body_schema is not None:
            return replace(req, json=params[BODY]) if BODY in params else req
        if op.body is not None:
            return replace(req, json={k: params[k] for k in op.body if k in params})
        return req

    def describe_operation(self, name: str, op: Operation) -> str:
        assert isinstance(op, RestOperation)
        return f"{op.method} {op.path}"
