"""The graphql kind through real workers and the ledger, against a real GraphQL server on loopback
(tests/graphql_server.py: graphql-core validating and executing each document against a slice
of GitHub's schema, served by uvicorn).

Each test uses repositories of its own name (the ``key`` fixture), so it reads only its requests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgi_server import serve
from conftest import TOKEN
from graphql_server import GraphqlServer
from procs import cli, wait_for

from integrations import coordination, health, http
from integrations.config import Settings
from integrations.errors import ConfigError, InvalidParams, PermanentError, RateLimited
from integrations.ledger import reads
from integrations.services import Attempt, get_services, load_services
from integrations.services.graphql import GraphqlService
from integrations.services.graphql_errors import judge
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def server() -> Iterator[GraphqlServer]:
    gql = GraphqlServer(TOKEN)
    with serve(gql.app, port=int(os.environ["GRAPHQL_PORT"])):
        yield gql


def run(service: str, operation: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = call_service.delay(service, operation, params).get(timeout=40)
    return out


def job_of(job_id: str) -> dict[str, Any]:
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None
    return job


def titles(out: dict[str, Any]) -> list[int]:
    return [n["number"] for n in out["data"]["repository"]["issues"]["nodes"]]


# ---- success ------------------------------------------------------------------------------------


def test_a_query_is_posted_with_its_variables_and_returns_the_data(server: GraphqlServer, key: str) -> None:
    out = run("gh_graphql", "repo_issues", owner="octocat", name=key, n="2", states=["OPEN"])

    # Issues 1..12, every third closed: the last two open ones.
    assert titles(out) == [10, 11]
    repo = out["data"]["repository"]
    assert repo["nameWithOwner"] == f"octocat/{key}" and repo["issues"]["totalCount"] == 12
    assert repo["issues"]["nodes"][0] == {
        "number": 10,
        "title": f"Issue 10 of {key}",
        "state": "OPEN",
        "author": {"login": "octocat"},
    }
    (hit,) = server.hits_for(key)
    document = get_services()["gh_graphql"].catalog()["repo_issues"].document  # type: ignore[attr-defined]
    assert hit.endpoint == "/graphql"
    assert hit.body == {
        "query": document,
        "variables": {"owner": "octocat", "name": key, "n": 2, "states": ["OPEN"]},
        "operationName": "RepoIssues",
    }
    assert hit.headers["authorization"] == f"Bearer {TOKEN}"
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["accept"].startswith("application/graphql-response+json")
    assert hit.headers["idempotency-key"] == out["job_id"]

    row = job_of(out["job_id"])
    assert (row["status"], row["status_code"], row["attempts"], row["meta"]) == ("succeeded", 200, 1, None)
    assert "meta" not in out  # no errors, nothing to keep
    assert row["response_excerpt"].startswith('{"data":{"repository":')


def test_a_variable_left_out_takes_the_documents_default(server: GraphqlServer, key: str) -> None:
    out = run("gh_graphql", "repo_issues", owner="octocat", name=key)
    assert titles(out) == list(range(3, 13))  # last: $n = 10
    (hit,) = server.hits_for(key)
    assert hit.body["variables"] == {"owner": "octocat", "name": key}
    schema = get_services()["gh_graphql"].catalog()["repo_issues"].parameters
    assert schema["properties"]["n"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}
    assert schema["required"] == ["owner", "name"]
    assert schema["properties"]["owner"]["description"] == "The account that owns the repository."


def test_a_mutation_takes_an_input_object_checked_at_submit(server: GraphqlServer) -> None:
    body = f"LGTM {time.time()}"
    out = run("gh_graphql", "add_comment", input={"subjectId": "I_repo_1", "body": body})
    assert out["data"]["addComment"]["commentEdge"]["node"] == {"body": body, "author": {"login": "octocat"}}
    assert any(h.body.get("operationName") == "AddComment" for h in server.hits_for(None))

    sent = len(server.hits)
    with pytest.raises(InvalidParams, match=r"input\.body: required"):
        call_service.delay("gh_graphql", "add_comment", {"input": {"subjectId": "I_repo_1"}})
    with pytest.raises(InvalidParams, match="n: fails maximum"):
        call_service.delay("gh_graphql", "repo_issues", {"owner": "o", "name": "r", "n": 500})
    assert len(server.hits) == sent  # refused before anything was queued


# ---- errors in the answer -----------------------------------------------------------------------


def test_partial_data_succeeds_with_the_errors_kept_on_the_job(server: GraphqlServer, key: str) -> None:
    server.plan(key, "partial")
    out = run("gh_graphql", "repo_issues", owner="octocat", name=key, n=12)

    nodes = out["data"]["repository"]["issues"]["nodes"]
    assert [n["author"] for n in nodes] == [None, {"login": "octocat"}] * 6  # odd issues refused
    expected = [
        {
            "message": "Resource not accessible by integration",
            "path": ["repository", "issues", "nodes", i, "author"],
            "code": "FORBIDDEN",
        }
        for i in range(0, 12, 2)
    ]
    assert out["meta"] == {"errors": expected}
    row = job_of(out["job_id"])
    assert (row["status"], row["attempts"], row["meta"]) == ("succeeded", 1, {"errors": expected})

    # GitHub's answer for a repository that does not exist: data with a null, and an error.
    missing = run("gh_graphql", "repo_issues", owner="octocat", name=f"missing-{key}")
    assert missing["data"] == {"repository": None}
    assert missing["meta"]["errors"] == [
        {
            "message": f"Could not resolve to a Repository with the name 'octocat/missing-{key}'.",
            "path": ["repository"],
            "code": "NOT_FOUND",
        }
    ]


@pytest.mark.parametrize(
    ("service", "status", "message"),
    [
        # GitHub answers a document that does not validate with a 200 and no data.
        ("gh_graphql", 200, "GraphQL error: Cannot query field 'bogus' on type 'Issue'."),
        # GraphQL over HTTP (application/graphql-response+json): a 400.
        ("graphql_spec", 400, "HTTP 400 Bad Request: Cannot query field 'bogus' on type 'Issue'."),
    ],
)
def test_a_document_the_server_refuses_fails_at_once_with_its_message(
    server: GraphqlServer, key: str, service: str, status: int, message: str
) -> None:
    result = call_service.delay(service, "unknown_field", {"name": key})
    with pytest.raises(PermanentError) as e:
        result.get(timeout=30)

    assert str(e.value) == message
    row = job_of(result.id)
    assert (row["status"], row["attempts"], row["status_code"]) == ("failed", 1, status)
    assert row["error"] == message
    assert row["meta"] == {"errors": [{"message": "Cannot query field 'bogus' on type 'Issue'."}]}
    assert len(server.hits_for(key)) == 1


def test_a_502_is_retried(server: GraphqlServer, key: str) -> None:
    server.plan(key, "status:502")
    out = run("gh_graphql", "repo_issues", owner="octocat", name=key, n=1)

    assert titles(out) == [12]
    row = job_of(out["job_id"])
    assert row["attempts"] == 2 and len(server.hits_for(key)) == 2
    first = row["attempts_log"][0]
    assert (first["outcome"], first["status_code"]) == ("retrying", 502)
    assert first["error"].startswith("HTTP 502 Bad Gateway: Something went wrong while executing your query.")


# ---- rate limits ----------------------------------------------------------------------------------


def test_a_rate_limited_answer_holds_every_worker_until_the_reset(server: GraphqlServer, key: str) -> None:
    # https://docs.github.com/en/graphql/overview/rate-limits-and-node-limits-for-the-graphql-api:
    # a 200 whose error's type is RATE_LIMITED, x-ratelimit-remaining: 0 and the reset time.
    server.plan(key, "rate_limited:3")
    first = call_service.delay("graphql_paused", "repo_issues", {"owner": "octocat", "name": key, "n": 1})
    wait_for(lambda: coordination.paused_for("graphql_paused") > 0, 10, "the service to be paused")
    reset = int(server.hits_for(key)[0].at) + 3
    others = [
        call_service.delay("graphql_paused", "repo_issues", {"owner": "octocat", "name": key, "n": 1})
        for _ in range(4)
    ]

    for r in [first, *others]:
        assert r.get(timeout=40)["status"] == "succeeded"
    later = server.hits_for(key)[1:]
    assert len(later) == 5  # the first job's second attempt and the four others, once each
    assert min(h.at for h in later) >= reset - 0.01
    row = job_of(first.id)
    assert row["attempts"] == 2
    limited = row["attempts_log"][0]
    assert (limited["outcome"], limited["status_code"]) == ("retrying", 200)
    assert limited["error"] == "rate limited: API rate limit exceeded for user ID 1234567."
    # Held, not failed: none of the others was charged an attempt for the wait.
    assert [job_of(r.id)["attempts"] for r in others] == [1] * 4


def test_a_spent_budget_on_a_success_holds_every_worker_until_the_reset(
    server: GraphqlServer, key: str
) -> None:
    server.plan(key, "spent:3")
    first = run("graphql_spent", "repo_issues", owner="octocat", name=key, n=1)
    assert titles(first) == [12]
    assert coordination.paused_for("graphql_spent") > 0
    reset = int(server.hits_for(key)[0].at) + 3

    others = [
        call_service.delay("graphql_spent", "repo_issues", {"owner": "octocat", "name": key, "n": 1})
        for _ in range(4)
    ]
    for r in others:
        assert r.get(timeout=40)["status"] == "succeeded"
    later = server.hits_for(key)[1:]
    assert len(later) == 4 and min(h.at for h in later) >= reset - 0.01


# ---- the command line, health, the services file --------------------------------------------------


def test_the_cli_lists_the_operations_and_calls_one(server: GraphqlServer, key: str) -> None:
    listing = cli("services")
    assert listing.returncode == 0, listing.stderr
    port = os.environ["GRAPHQL_PORT"]
    assert f"gh_graphql (graphql, http://127.0.0.1:{port}/graphql, auth bearer" in listing.stdout
    assert "  repo_issues: query RepoIssues($owner, $name, $n, $states)" in listing.stdout
    assert "  add_comment: mutation AddComment($input)" in listing.stdout

    out = cli(
        "call", "gh_graphql", "repo_issues", "owner=octocat", f"name={key}", "n=1",
        "--wait", "--timeout", "30",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and titles(result) == [12]
    assert server.hits_for(key)[0].body["variables"] == {"owner": "octocat", "name": key, "n": 1}


def test_the_health_check_asks_for_the_typename(server: GraphqlServer) -> None:
    before = len(server.hits_for(None))
    outcome = health.check(get_services()["gh_graphql"])
    assert (outcome.ok, outcome.status_code) == (True, 200)
    assert server.hits_for(None)[before].body == {"query": "query { __typename }"}


SERVICE = """
services:
  svc:
    kind: graphql
    base_url: https://api.github.com
    path: /graphql
    operations:
      op: OP
"""


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (
            {"document": "query($a: Int) { x(a: $a) "},
            "op.document: does not parse (Syntax Error: Expected Name, found <EOF> at line 1, column 27)",
        ),
        (
            {"document": "query($owner: String!) { repository(owner: $owner) { id } }"},
            "op: variables: the document declares $owner, not listed here",
        ),
        (
            {"document": "query { viewer { login } }", "variables": {"login": "str"}},
            "op: variables.login: not a variable the document declares",
        ),
        (
            {"document": "query($o: String!) { user(login: $o) { id } }", "variables": {"o": "str | None"}},
            "op: variables.o: the document requires it (String!); it is optional here",
        ),
        (
            {"document": "query($n: Int = 10) { viewer { id(n: $n) } }", "variables": {"n": "int"}},
            "op: variables.n: the document lets it be left out (Int with a default); it is required here",
        ),
        (
            {"document": "query($n: Int!) { viewer { id(n: $n) } }", "variables": {"n": "str"}},
            "op: variables.n: the document declares Int!, which is not string",
        ),
        (
            {"document": "query($a: ID!) { node(id: $a) { ...F } } fragment F on Issue { c(first: $b) }"},
            "op: variables: the document declares $a, not listed here",
        ),
        (
            {
                "document": "query($a: ID!) { node(id: $a) { ...F } } fragment F on Issue { c(first: $b) }",
                "variables": {"a": "str"},
            },
            "op: document: uses $b without declaring it in the operation",
        ),
        (
            {"document": "query($a: ID) { viewer { id } }", "variables": {"a": "str | None"}},
            "op: document: declares $a and never uses it",
        ),
        (
            {"document": "query A { a } query B { b }"},
            "op: operation_name: the document holds several operations; name the one to run",
        ),
        (
            {"document": "query A { a }", "operation_name": "C"},
            "op: operation_name: the document has no operation of that name",
        ),
        (
            {"document": "subscription { issueAdded { id } }"},
            "op: document: a subscription does not run over one HTTP request",
        ),
        ({"document": "fragment F on Issue { id }"}, "op: document: holds no operation"),
    ],
)
def test_a_document_that_does_not_parse_or_match_its_variables_is_refused_at_load(
    tmp_path: Path, op: dict[str, Any], message: str
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(SERVICE.replace("OP", json.dumps(op)))
    with pytest.raises(ConfigError) as e:
        load_services(path, Settings())
    assert str(e.value) == f"services.svc.operations.{message}"


def test_a_named_operation_of_several_is_the_one_sent(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    op: dict[str, Any] = {"document": "query A { a } query B($x: [Int]) { b(x: $x) }", "operation_name": "B"}
    op["variables"] = {"x": {"type": "array", "items": {"type": "integer"}, "required": False}}
    path.write_text(SERVICE.replace("OP", json.dumps(op)))
    svc = load_services(path, Settings())["svc"]
    assert isinstance(svc, GraphqlService)
    req = svc.request(svc.catalog()["op"], {"x": [1]}, Attempt("job-1"))
    assert req.method == "POST" and req.url == "https://api.github.com/graphql"
    assert req.json == {"query": op["document"], "variables": {"x": [1]}, "operationName": "B"}


# ---- the one place answers are judged -------------------------------------------------------------


def answer(status: int, body: Any, **headers: str) -> http.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.Response(
        status, "OK" if status == 200 else "", {"content-type": "application/json", **headers}, raw, 1.0
    )


def test_a_rate_limit_code_in_extensions_waits_as_the_headers_say() -> None:
    # Shopify's throttled answer: https://shopify.dev/docs/api/usage/rate-limits
    body = {"errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}]}
    with pytest.raises(RateLimited) as e:
        judge(answer(200, body, **{"retry-after": "7"}), retry_after_max=60)
    assert (e.value.retry_after, str(e.value)) == (7.0, "rate limited: Throttled")
    with pytest.raises(RateLimited) as e:
        judge(answer(200, body, **{"x-ratelimit-reset": "1000"}), retry_after_max=60, now=990.0)
    assert e.value.retry_after == 10.0
    with pytest.raises(RateLimited) as e:
        judge(answer(200, body, **{"x-ratelimit-reset": "5000"}), retry_after_max=60, now=990.0)
    assert e.value.retry_after == 60.0  # capped
    with pytest.raises(RateLimited) as e:
        judge(answer(200, body), retry_after_max=60)
    assert e.value.retry_after is None  # backoff, then


def test_errors_with_null_data_are_permanent_and_bounded() -> None:
    errors = [{"message": f"line one\nline two {i} " + "x" * 400, "path": ["a", i]} for i in range(25)]
    with pytest.raises(PermanentError) as e:
        judge(answer(200, {"data": None, "errors": errors}), retry_after_max=60)
    text = str(e.value)
    assert "\n" not in text and text.startswith("GraphQL error: line one line two 0 xxx")
    assert text.endswith("… (and 24 more)") and len(text) < 400
    assert len(e.value.meta["errors"]) == 10 and e.value.meta["errors_omitted"] == 15
    assert e.value.meta["errors"][3]["path"] == ["a", 3]


@pytest.mark.parametrize(
    ("resp", "message"),
    [
        (answer(200, {}), "the answer holds neither data nor errors"),
        (
            answer(200, b"<html>hi</html>", **{"content-type": "text/html"}),
            "the answer is not a GraphQL response (text/html)",
        ),
    ],
)
def test_an_answer_that_is_not_graphql_is_permanent(resp: http.Response, message: str) -> None:
    with pytest.raises(PermanentError) as e:
        judge(resp, retry_after_max=60)
    assert str(e.value) == message
