"""GraphQL APIs: operations declared in the services file as a document and the schema of its
variables; each call POSTs ``{query, variables, operationName}`` to the service's endpoint.

::

    github_graphql:
      kind: graphql
      base_url: https://api.github.com
      path: /graphql
      auth: {type: bearer, token: ${GITHUB_TOKEN}}
      operations:
        repo_issues:
          description: The latest issues of a repository.
          document: |
            query RepoIssues($owner: String!, $name: String!, $n: Int = 10) {
              repository(owner: $owner, name: $name) { issues(last: $n) { nodes { number title } } }
            }
          variables: {owner: str, name: str, n: "int | None"}

At load, the document must parse, hold one query or mutation (or name it: ``operation_name``),
and declare exactly the variables listed, a variable being required here exactly when the
document says ``Type!`` without a default (https://spec.graphql.org/October2021/#sec-Variables).

The answer is judged in one place, :func:`judge`: a rate-limit error in the body is
:class:`RateLimited` (even in a 200, as GitHub answers it); errors without data are permanent;
data with errors succeeds, the errors kept on the job (``meta.errors``); other HTTP statuses are
classified as every HTTP kind's are.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from graphql import (
    DocumentNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLSyntaxError,
    ListTypeNode,
    NamedTypeNode,
    Node,
    NonNullTypeNode,
    OperationDefinitionNode,
    OperationType,
    TypeNode,
    VariableDefinitionNode,
    VariableNode,
    Visitor,
    parse,
    print_ast,
    value_from_ast_untyped,
    visit,
)
from graphql.language.visitor import SKIP, VisitorAction
from pydantic import Field, field_validator

from integrations import http, redact
from integrations.config import get_settings
from integrations.errors import CallError, PermanentError, RateLimited
from integrations.services import params as P
from integrations.services.base import Attempt, Operation, Outcome
from integrations.services.http_service import HttpService

#: A variable in the services file: a short type (``"int | None"``) or a JSON Schema.
ParamSpec = str | dict[str, Any]

#: Error codes that mean "slow down", in an error's ``type`` (GitHub:
#: https://docs.github.com/en/graphql/overview/rate-limits-and-node-limits-for-the-graphql-api),
#: ``code`` or ``extensions.code`` (Shopify's ``THROTTLED``:
#: https://shopify.dev/docs/api/usage/rate-limits), compared upper-cased.
RATE_LIMIT_CODES = frozenset(
    {
        "RATE_LIMITED",
        "RATE_LIMIT_EXCEEDED",
        "RATELIMITED",
        "THROTTLED",
        "TOO_MANY_REQUESTS",
        "GRAPHQL_RATE_LIMIT",
    }
)
#: What a job keeps of an answer's errors: this many, each message cut to MESSAGE_MAX characters.
ERRORS_KEPT = 10
MESSAGE_MAX = 300
#: The cheapest query every GraphQL schema answers (the health check of the kind's own).
TYPENAME_QUERY = "query { __typename }"
#: GraphQL over HTTP: https://graphql.github.io/graphql-over-http/draft/#sec-Accept
ACCEPT = "application/graphql-response+json, application/json;q=0.9"

#: JSON Schema types a built-in scalar's value may have (https://spec.graphql.org/October2021/#sec-Scalars).
_SCALAR_TYPES: dict[str, set[str]] = {
    "Int": {"integer"},
    "Float": {"number", "integer"},
    "String": {"string"},
    "ID": {"string", "integer"},
    "Boolean": {"boolean"},
}


@functools.lru_cache(maxsize=1024)
def _parse(document: str) -> DocumentNode:
    return parse(document)


class GraphqlOperation(Operation):
    """``{document, variables, operation_name, description}``: one GraphQL operation."""

    document: str = Field(min_length=1)
    #: The JSON Schema of each of the document's variables, by name (without the ``$``).
    variables: dict[str, ParamSpec] = Field(default_factory=dict)
    #: Which of the document's operations to run, when it holds several.
    operation_name: str | None = None

    @field_validator("document")
    @classmethod
    def _parses(cls, v: str) -> str:
        try:
            _parse(v)
        except GraphQLSyntaxError as e:
            where = f" at line {e.locations[0].line}, column {e.locations[0].column}" if e.locations else ""
            raise ValueError(f"does not parse ({e.message.rstrip('.')}{where})") from None
        return v

    @property
    def definition(self) -> OperationDefinitionNode:
        """The operation of the document this one runs."""
        ops = [d for d in _parse(self.document).definitions if isinstance(d, OperationDefinitionNode)]
        if self.operation_name is not None:
            named = [op for op in ops if op.name is not None and op.name.value == self.operation_name]
            if not named:
                raise ValueError("operation_name: the document has no operation of that name")
            return named[0]
        if len(ops) != 1:
            raise ValueError(
                "document: holds no operation"
                if not ops
                else "operation_name: the document holds several operations; name the one to run"
            )
        return ops[0]

    @property
    def operation_type(self) -> str:
        return self.definition.operation.value

    def build_parameters(self) -> dict[str, Any]:
        op = self.definition
        if op.operation == OperationType.SUBSCRIPTION:
            raise ValueError("document: a subscription does not run over one HTTP request")
        declared = {d.variable.name.value: d for d in op.variable_definitions or ()}
        missing = [name for name in declared if name not in self.variables]
        if missing:
            names = ", ".join(f"${n}" for n in missing)
            raise ValueError(f"variables: the document declares {names}, not listed here")
        for name in self.variables:
            if name not in declared:
                raise ValueError(f"variables.{name}: not a variable the document declares")
        used = _variables_used(_parse(self.document), op)
        if used - declared.keys():
            names = ", ".join(f"${n}" for n in sorted(used - declared.keys()))
            raise ValueError(f"document: uses {names} without declaring it in the operation")
        if declared.keys() - used:
            names = ", ".join(f"${n}" for n in sorted(declared.keys() - used))
            raise ValueError(f"document: declares {names} and never uses it")

        props: dict[str, dict[str, Any]] = {}
        required: list[str] = []
        for name, node in declared.items():
            schema, needed = P.field(self.variables[name])
            _check_variable(name, node, schema, needed)
            if node.default_value is not None and "default" not in schema:
                schema = {**schema, "default": value_from_ast_untyped(node.default_value)}
            props[name] = schema
            if needed:
                required.append(name)
        about = (
            self.description or f"Runs this GraphQL {op.operation.value}: {' '.join(self.document.split())}"
        )
        return P.object_schema(props, required, about)


def _check_variable(name: str, node: VariableDefinitionNode, schema: Mapping[str, Any], needed: bool) -> None:
    """Raise ``ValueError`` when a variable's schema here disagrees with its type in the document."""
    type_text = print_ast(node.type)
    must = isinstance(node.type, NonNullTypeNode) and node.default_value is None
    if must and not needed:
        raise ValueError(f"variables.{name}: the document requires it ({type_text}); it is optional here")
    if needed and not must:
        raise ValueError(
            f"variables.{name}: the document lets it be left out ({type_text}"
            f"{' with a default' if node.default_value is not None else ''}); it is required here"
        )
    allowed = _json_types(node.type)
    given = schema.get("type")
    kinds = {given} if isinstance(given, str) else set(given) if isinstance(given, list) else set()
    if not isinstance(node.type, NonNullTypeNode):
        kinds.discard("null")
    if allowed is not None and kinds - allowed:
        raise ValueError(
            f"variables.{name}: the document declares {type_text}, which is not {' or '.join(sorted(kinds))}"
        )


def _json_types(node: TypeNode) -> set[str] | None:
    """The JSON Schema types a value of GraphQL type ``node`` may have (``None``: any, for enums,
    input objects and custom scalars, which only the server's schema knows)."""
    if isinstance(node, NonNullTypeNode):
        return _json_types(node.type)
    if isinstance(node, ListTypeNode):
        inner = _json_types(node.type)
        # A single value is coerced to a list of one (https://spec.graphql.org/October2021/#sec-List.Input-Coercion).
        return None if inner is None else {"array", *inner}
    return _SCALAR_TYPES.get(node.name.value) if isinstance(node, NamedTypeNode) else None


def _variables_used(doc: DocumentNode, op: OperationDefinitionNode) -> set[str]:
    """The variables ``op`` uses, in its selections and in the fragments it spreads, however deep."""
    fragments = {d.name.value: d for d in doc.definitions if isinstance(d, FragmentDefinitionNode)}
    collector = _Collector()
    seen: set[str] = set()
    todo: list[Node] = [op]
    while todo:
        visit(todo.pop(), collector)
        for spread in collector.spreads - seen:
            seen.add(spread)
            if spread in fragments:
                todo.append(fragments[spread])
    return collector.variables


class _Collector(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.variables: set[str] = set()
        self.spreads: set[str] = set()

    def enter_variable_definition(self, node: VariableDefinitionNode, *_: Any) -> VisitorAction:
        return SKIP  # a definition, not a use

    def enter_variable(self, node: VariableNode, *_: Any) -> None:
        self.variables.add(node.name.value)

    def enter_fragment_spread(self, node: FragmentSpreadNode, *_: Any) -> None:
        self.spreads.add(node.name.value)


# ---- the answer ------------------------------------------------------------------------------


def judge(
    resp: http.Response, retry_after_max: float, now: float | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(data, meta)`` of a GraphQL answer, or raise the error it stands for (its ``meta``
    set too). ``meta`` holds a bounded summary of the answer's errors, when it has any.

    - an error whose ``type``, ``code`` or ``extensions.code`` says rate-limited, whatever the
      status: :class:`RateLimited`, after ``Retry-After`` or else ``x-ratelimit-reset``;
    - a status other than 2xx: as :func:`integrations.http.classify` says, with the first
      GraphQL error's message when the body has one;
    - a 2xx without data (absent or null): permanent, with the first error's message;
    - data, with or without errors: returned.
    """
    parsed = resp.data()
    body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    raw = body.get("errors")
    errors = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
    summary = [_summary(e) for e in errors[:ERRORS_KEPT]]
    first = _message(errors)
    err: CallError | None = None
    if any(_rate_limited(e) for e in errors):
        delay = _retry_after(resp, retry_after_max, now)
        err = RateLimited(f"rate limited: {first}", status_code=resp.status_code, retry_after=delay)
    elif (err := http.classify(resp, retry_after_max)) is not None:
        if first and not isinstance(err, RateLimited):
            err = type(err)(f"{err}: {first}", status_code=err.status_code)
    elif not isinstance(parsed, dict):
        kind = resp.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        err = PermanentError(
            f"the answer is not a GraphQL response ({_text(kind)[:64]})", status_code=resp.status_code
        )
    elif body.get("data") is None:
        err = PermanentError(
            f"GraphQL error: {first}" if first else "the answer holds neither data nor errors",
            status_code=resp.status_code,
        )
    meta = _meta(summary, len(errors))
    if err is not None:
        err.meta = meta
        raise err
    return body["data"], meta


def _meta(summary: list[dict[str, Any]], total: int) -> dict[str, Any]:
    if not summary:
        return {}
    return {"errors": summary, **({"errors_omitted": total - len(summary)} if total > len(summary) else {})}


def _codes(error: Mapping[str, Any]) -> list[str]:
    ext = error.get("extensions")
    found = [error.get("type"), error.get("code"), ext.get("code") if isinstance(ext, dict) else None]
    return [c for c in found if isinstance(c, str) and c]


def _rate_limited(error: Mapping[str, Any]) -> bool:
    return any(c.upper().replace("-", "_") in RATE_LIMIT_CODES for c in _codes(error))


def _text(value: Any) -> str:
    """One line of at most MESSAGE_MAX characters, without this process's credentials."""
    line = " ".join(str(value).split())
    line = redact.redact(line)
    return line if len(line) <= MESSAGE_MAX else line[: MESSAGE_MAX - 1] + "…"


def _message(errors: list[dict[str, Any]]) -> str:
    """The first error's message, and how many more there are."""
    if not errors:
        return ""
    text = _text(errors[0].get("message") or "no message")
    return text + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _summary(error: Mapping[str, Any]) -> dict[str, Any]:
    """What the job keeps of one error: its message, where (``path``) and its code."""
    out: dict[str, Any] = {"message": _text(error.get("message") or "")}
    path = error.get("path")
    if isinstance(path, list):
        out["path"] = [p if isinstance(p, int) else _text(p)[:64] for p in path[:20]]
    codes = _codes(error)
    if codes:
        out["code"] = _text(codes[0])[:64]
    return out


def _retry_after(resp: http.Response, cap: float, now: float | None) -> float | None:
    """``Retry-After`` (seconds or a date), else the seconds until ``x-ratelimit-reset`` (epoch
    seconds, GitHub's), capped at ``cap``; ``None`` when neither says."""
    delay = http.parse_retry_after(resp.headers.get("retry-after"))
    reset = resp.headers.get("x-ratelimit-reset", "").strip()
    if delay is None and reset.isdigit():
        delay = max(0.0, int(reset) - (time.time() if now is None else now))
    return None if delay is None else min(delay, cap)


# ---- the kind --------------------------------------------------------------------------------


class GraphqlService(HttpService):
    kind: Literal["graphql"] = "graphql"
    health_own_check: ClassVar[bool] = True

    #: Where the endpoint is under ``base_url`` (``/graphql``); none: ``base_url`` itself.
    path: str | None = Field(None, pattern=r"^/[^\s?#]*$")
    operations: dict[str, GraphqlOperation] = Field(min_length=1)

    @property
    def endpoint(self) -> str:
        return self.base_url + (self.path or "")

    def catalog(self) -> Mapping[str, GraphqlOperation]:
        return self.operations

    def request(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> http.Request:
        assert isinstance(op, GraphqlOperation)
        payload: dict[str, Any] = {"query": op.document, "variables": params}
        name = op.definition.name
        if name is not None:
            payload["operationName"] = name.value
        return self._post(payload)

    def interpret(self, resp: http.Response, op: Operation | None) -> Outcome:
        # The budget headers pause every worker whatever the answer (GitHub's GraphQL API sends
        # the REST API's x-ratelimit-* headers, counted in points).
        pause = http.budget_spent_for(resp, cap=self.retry.retry_after_max)
        excerpt = resp.excerpt(get_settings().ledger_body_max_bytes)
        try:
            data, meta = judge(resp, self.retry.retry_after_max)
        except CallError as err:
            raise self.enrich(err, resp, excerpt, pause) from None
        return Outcome(
            data=data,
            status_code=resp.status_code,
            latency_ms=resp.latency_ms,
            excerpt=excerpt,
            meta=meta,
            pause=pause,
        )

    def check_health(self) -> Outcome:
        """``query { __typename }``, unless ``health`` names an operation or a path."""
        h = self.health
        if h is not None and (h.operation is not None or h.path is not None):
            return super().check_health()
        return self.interpret(self.send(self._post({"query": TYPENAME_QUERY})), None)

    def _post(self, payload: dict[str, Any]) -> http.Request:
        # The service's own Accept header, when it sets one, wins.
        own = {k.lower() for k in self.headers}
        headers = {} if "accept" in own else {"Accept": ACCEPT}
        return http.Request("POST", self.endpoint, json=payload, headers=headers)

    def describe(self) -> str:
        return f"{self.kind}, {self.endpoint}, auth {self.auth.type}"

    def describe_operation(self, name: str, op: Operation) -> str:
        assert isinstance(op, GraphqlOperation)
        d = op.definition
        args = ", ".join(f"${v.variable.name.value}" for v in d.variable_definitions or ())
        return f"{d.operation.value}{' ' + d.name.value if d.name else ''}({args})"
