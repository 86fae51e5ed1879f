"""A real GraphQL server on loopback: a small slice of GitHub's GraphQL schema (repository ->
issues -> author, and the addComment mutation), parsed, validated and executed by graphql-core,
served by uvicorn (tests/asgi_server.py).

Two endpoints run the same schema:

- ``/graphql`` answers as GitHub's GraphQL API does: 200 for every GraphQL error, an error's
  ``type`` beside its message, and the ``x-ratelimit-*`` headers of a points budget
  (https://docs.github.com/en/graphql/overview/rate-limits-and-node-limits-for-the-graphql-api);
- ``/spec`` as GraphQL over HTTP says for ``application/graphql-response+json``: a document that
  does not validate is a 400 (https://graphql.github.io/graphql-over-http/draft/#sec-application-graphql-response-json).

A test programs what the next answers for a key (the ``name`` variable: the repository's name)
are, with :meth:`GraphqlServer.plan`; every request is recorded with its arrival time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from graphql import GraphQLError, build_schema, graphql_sync
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SDL = """
type Query {
  "Lookup a given repository by the owner and repository name."
  repository(owner: String!, name: String!): Repository
}

type Mutation {
  "Adds a comment to an Issue or Pull Request."
  addComment(input: AddCommentInput!): AddCommentPayload
}

type Repository {
  name: String!
  nameWithOwner: String!
  issues(first: Int, last: Int, states: [IssueState!]): IssueConnection!
}

type IssueConnection {
  totalCount: Int!
  nodes: [Issue]
}

type Issue {
  id: ID!
  number: Int!
  title: String!
  state: IssueState!
  author: Actor
}

type Actor {
  login: String!
}

enum IssueState {
  OPEN
  CLOSED
}

input AddCommentInput {
  subjectId: ID!
  body: String!
  clientMutationId: String
}

type AddCommentPayload {
  clientMutationId: String
  commentEdge: IssueCommentEdge
}

type IssueCommentEdge {
  node: IssueComment
}

type IssueComment {
  body: String!
  author: Actor
}
"""

ISSUES_PER_REPOSITORY = 12

#: The body of GitHub's answer when the points budget is spent: still a 200 (the page above,
#: "Exceeding the rate limit"), with ``x-ratelimit-remaining: 0``.
RATE_LIMITED_BODY = {
    "errors": [{"type": "RATE_LIMITED", "message": "API rate limit exceeded for user ID 1234567."}]
}
#: GitHub's 502 when a query runs too long.
BAD_GATEWAY_BODY = {
    "data": None,
    "errors": [
        {
            "message": "Something went wrong while executing your query. This may be the result of a "
            "timeout, or it could be a GitHub bug. Please include `0400:3F2A:1B9C6A:3B1F4C:66F0D1A2` "
            "when reporting this issue."
        }
    ],
}


@dataclass
class Hit:
    at: float
    endpoint: str
    key: str | None
    headers: dict[str, str]
    body: dict[str, Any]


def _issue(repo: str, number: int, state: str) -> dict[str, Any]:
    return {
        "id": f"I_{repo}_{number}",
        "number": number,
        "title": f"Issue {number} of {repo}",
        "state": state,
        "author": lambda info: _author(info, number),
    }


def _author(info: Any, number: int) -> dict[str, Any]:
    """An issue's author; a token without access to odd issues' authors gets GitHub's FORBIDDEN."""
    if info.context.get("partial") and number % 2 == 1:
        raise GraphQLError("Resource not accessible by integration", extensions={"type": "FORBIDDEN"})
    return {"login": "octocat"}


def _repository(info: Any, owner: str, name: str) -> dict[str, Any] | None:
    if name.startswith("missing-"):
        raise GraphQLError(
            f"Could not resolve to a Repository with the name '{owner}/{name}'.",
            extensions={"type": "NOT_FOUND"},
        )

    def issues(
        info: Any, first: int | None = None, last: int | None = None, states: list[str] | None = None
    ) -> dict[str, Any]:
        every = [
            _issue(name, n, "CLOSED" if n % 3 == 0 else "OPEN") for n in range(1, ISSUES_PER_REPOSITORY + 1)
        ]
        chosen = [i for i in every if states is None or i["state"] in states]
        if first is not None:
            chosen = chosen[:first]
        if last is not None:
            chosen = chosen[-last:]
        return {"totalCount": len(every), "nodes": chosen}

    return {"name": name, "nameWithOwner": f"{owner}/{name}", "issues": issues}


def _add_comment(info: Any, input: dict[str, Any]) -> dict[str, Any]:
    return {
        "clientMutationId": input.get("clientMutationId"),
        "commentEdge": {"node": {"body": input["body"], "author": {"login": "octocat"}}},
    }


ROOT = {"repository": _repository, "addComment": _add_comment}


class GraphqlServer:
    """The app and what it saw; ``plan(key, step, ...)`` queues the next answers for ``key``:

    - ``"rate_limited:N"``: GitHub's RATE_LIMITED body, budget spent until N seconds from now;
    - ``"spent:N"``: the query runs, and the headers say the budget is spent for N seconds;
    - ``"partial"``: the query runs, the odd issues' authors refused (partial data);
    - ``"status:NNN"``: that HTTP status, with GitHub's 502 body.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.schema = build_schema(SDL)
        self.lock = threading.Lock()
        self.plans: dict[str, deque[str]] = defaultdict(deque)
        self.hits: list[Hit] = []
        self.app = Starlette(
            routes=[
                Route("/graphql", self._github, methods=["POST"]),
                Route("/spec", self._spec, methods=["POST"]),
            ]
        )

    def plan(self, key: str, *steps: str) -> None:
        with self.lock:
            self.plans[key].extend(steps)

    def hits_for(self, key: str | None) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.key == key]

    # ---- the endpoints -----------------------------------------------------------------------

    async def _github(self, request: Request) -> Response:
        return await self._answer(request, github=True)

    async def _spec(self, request: Request) -> Response:
        return await self._answer(request, github=False)

    async def _answer(self, request: Request, github: bool) -> Response:
        at = time.time()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"errors": [{"message": "the body is not JSON"}]}, status_code=400)
        variables = body.get("variables") or {}
        key = variables.get("name") if isinstance(variables, dict) else None
        with self.lock:
            self.hits.append(Hit(at, request.url.path, key, dict(request.headers), body))
            step = self.plans[key].popleft() if key is not None and self.plans[key] else ""
        if request.headers.get("authorization") != f"Bearer {self.token}":
            # https://docs.github.com/en/graphql/guides/forming-calls-with-graphql#authenticating-with-a-personal-access-token
            return JSONResponse(
                {"message": "Bad credentials", "documentation_url": "https://docs.github.com/graphql"},
                status_code=401,
            )
        what, _, arg = step.partition(":")
        headers = _budget(remaining=4999, reset_in=3600)
        if what == "status":
            return JSONResponse(BAD_GATEWAY_BODY, status_code=int(arg))
        if what == "rate_limited":
            return JSONResponse(RATE_LIMITED_BODY, headers=_budget(remaining=0, reset_in=int(arg)))
        if what == "spent":
            headers = _budget(remaining=0, reset_in=int(arg))
        result = graphql_sync(
            self.schema,
            str(body.get("query", "")),
            root_value=ROOT,
            context_value={"partial": what == "partial"},
            variable_values=variables if isinstance(variables, dict) else None,
            operation_name=body.get("operationName"),
        )
        out: dict[str, Any] = {}
        if result.errors:
            out["errors"] = [_as_github(e.formatted) if github else e.formatted for e in result.errors]
        # A request error (the document does not validate, a variable is wrong): no data at all.
        # https://spec.graphql.org/October2021/#sec-Data
        request_error = result.data is None and not any(e.path for e in result.errors or ())
        if not request_error:
            out["data"] = result.data
        if request_error and not github:
            return JSONResponse(out, status_code=400, media_type="application/graphql-response+json")
        media = "application/json" if github else "application/graphql-response+json"
        return JSONResponse(out, headers=headers, media_type=media)


def _as_github(formatted: Any) -> dict[str, Any]:
    """GitHub puts an error's kind beside its message (``"type": "NOT_FOUND"``)."""
    error: dict[str, Any] = dict(formatted)
    ext = error.pop("extensions", None) or {}
    if "type" in ext:
        error["type"] = ext["type"]
    return error


def _budget(remaining: int, reset_in: int) -> dict[str, str]:
    """GitHub's rate-limit headers: points per hour, the reset in epoch seconds."""
    return {
        "x-ratelimit-limit": "5000",
        "x-ratelimit-remaining": str(remaining),
        "x-ratelimit-used": str(5000 - remaining),
        "x-ratelimit-reset": str(int(time.time()) + reset_in),
        "x-ratelimit-resource": "graphql",
    }
