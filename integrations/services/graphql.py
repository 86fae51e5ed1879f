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

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field

from integrations import http
from integrations.config import get_settings
from integrations.errors import CallError
from integrations.services.base import Attempt, Operation, Outcome
from integrations.services.graphql_errors import judge
from integrations.services.graphql_ops import GraphqlOperation
from integrations.services.http_service import HttpService

#: The cheapest query every GraphQL schema answers (the health check of the kind's own).
TYPENAME_QUERY = "query { __typename }"
#: GraphQL over HTTP: https://graphql.github.io/graphql-over-http/draft/#sec-Accept
ACCEPT = "application/graphql-response+json, application/json;q=0.9"


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
