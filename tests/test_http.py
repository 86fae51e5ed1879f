"""The HTTP choke point against a real loopback server: auth, pooling, timeouts, the SSRF guard."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

import pytest
from conftest import HEADER_TOKEN, TOKEN
from stub import Reply, Stub, TlsStub

from integrations import http, ssrf
from integrations.errors import PermanentError, RateLimited, TransientError
from integrations.jobs import resolve
from integrations.ledger import reads
from integrations.services import Attempt, get_services
from integrations.services.http_service import HttpService
from tasks import call_service


def call(service: str, op: str, params: dict[str, object], max_bytes: int = 65536) -> http.Response:
    svc, operation = resolve(service, op)
    assert isinstance(svc, HttpService)
    req = svc.request(operation, operation.validate_params(params), Attempt("job"))
    return http.send(svc, req, max_bytes)


def test_bearer_token_path_and_query_reach_the_server(stub: Stub, key: str) -> None:
    resp = call("stub", "echo", {"key": key, "q": "a b/c", "n": 3})
    assert resp.status_code == 200
    (hit,) = stub.hits_for(key)
    assert hit.headers["authorization"] == f"Bearer {TOKEN}"
    assert hit.query == {"q": ["a b/c"], "n": ["3"]}
    assert resp.data()["path"] == f"/echo/{key}"


def test_path_values_are_quoted_whole(stub: Stub, key: str) -> None:
    call("stub", "echo", {"key": key + "/admin?x=1#y"})
    (hit,) = stub.hits_for(key + "%2Fadmin%3Fx%3D1%23y")
    assert hit.path == f"/echo/{key}%2Fadmin%3Fx%3D1%23y"


def test_api_key_in_query_and_basic_auth(stub: Stub, key: str) -> None:
    call("stub_apikey", "echo", {"key": key})
    call("stub_basic", "echo", {"key": key})
    apikey, basic = stub.hits_for(key)
    assert apikey.query == {"api_key": [TOKEN]}
    assert "authorization" not in apikey.headers
    assert basic.headers["authorization"].startswith("Basic ")


def test_json_body_is_sent_for_post(stub: Stub, key: str) -> None:
    resp = call("stub", "create", {"key": key, "title": "hi", "count": 2})
    assert resp.data()["json"] == {"title": "hi", "count": 2}


def test_one_session_keeps_the_connection_alive(stub: Stub, key: str) -> None:
    for _ in range(3):
        call("stub", "echo", {"key": key})
    ports = {h.client_port for h in stub.hits_for(key)}
    assert len(ports) == 1


def test_timeout_and_dropped_connection_are_transient(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(delay=2.5), Reply(drop=True))
    with pytest.raises(TransientError, match=r"did not answer within 2\.0s"):
        call("stub", "echo", {"key": key})
    with pytest.raises(TransientError, match=r"connection .*failed"):
        call("stub", "echo", {"key": key})


def test_a_body_over_the_limit_is_refused(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(body=b"x" * 5000))
    with pytest.raises(PermanentError, match="larger than 4096 bytes"):
        call("stub", "echo", {"key": key}, max_bytes=4096)


def test_guard_refuses_loopback_private_and_link_local(stub: Stub, key: str) -> None:
    with pytest.raises(ssrf.BlockedAddress, match="not a public address"):
        call("guarded", "echo", {"key": key})
    assert stub.hits_for(key) == []
    for host in ("10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "localhost"):
        with pytest.raises(ssrf.BlockedAddress):
            ssrf.resolve(host, 80)


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (200, {}, None, None),
        (404, {}, PermanentError, None),
        (408, {}, TransientError, None),
        (500, {}, TransientError, None),
        (429, {"retry-after": "7"}, RateLimited, 7.0),
        (503, {"retry-after": "9999"}, RateLimited, 300.0),
        (429, {}, RateLimited, None),
        # GitHub's rate limits, primary and secondary, may come as 403.
        (403, {"x-ratelimit-remaining": "0"}, RateLimited, None),
        (403, {"retry-after": "60"}, RateLimited, 60.0),
        (403, {"x-ratelimit-remaining": "12"}, PermanentError, None),
    ],
)
def test_classification(
    status: int, headers: dict[str, str], kind: type | None, retry_after: float | None
) -> None:
    err = http.classify(http.Response(status, "", headers, b"", 1.0), retry_after_max=300)
    if kind is None:
        assert err is None
        return
    assert err is not None and type(err) is kind
    assert getattr(err, "retry_after", None) == retry_after
    assert err.retryable is (kind is not PermanentError)


def test_retry_after_as_http_date() -> None:
    now = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.UTC)
    assert http.parse_retry_after("Mon, 23 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert http.parse_retry_after("Mon, 23 Nov 2026 11:00:00 GMT", now=now) == 0.0
    assert http.parse_retry_after("soon", now=now) is None


def test_services_file_is_the_test_one() -> None:
    assert set(get_services()) >= {"stub", "stub_apikey", "stub_basic", "stub_limited", "guarded"}


# ------------------------------------------------------------------------------------------------
# README claims (issue 10): kind: github, ca_bundle:, headers:, ${VAR:-default}, through a worker
# ------------------------------------------------------------------------------------------------


def test_kind_github_sends_githubs_media_type_and_api_version(worker: Any, stub: Stub, key: str) -> None:
    # https://docs.github.com/en/rest/about-the-rest-api/api-versions and
    # https://docs.github.com/en/rest/using-the-rest-api/getting-started-with-the-rest-api#accept
    out = call_service.delay("stub_github", "get_repo", {"owner": key, "repo": "app"}).get(timeout=20)
    assert out["status"] == "succeeded" and out["data"]["path"] == f"/repos/{key}/app"
    call_service.delay("stub", "echo", {"key": key}).get(timeout=20)
    github, rest = stub.hits_for(key)
    assert github.headers["accept"] == "application/vnd.github+json"
    assert github.headers["x-github-api-version"] == "2022-11-28"
    # A plain REST service sends neither.
    assert rest.headers["accept"] == "*/*" and "x-github-api-version" not in rest.headers


def test_ca_bundle_trusts_a_private_ca_that_nothing_else_trusts(
    worker: Any, tls_stub: TlsStub, key: str
) -> None:
    with pytest.raises(TransientError, match=r"connection to 127\.0\.0\.1 failed \(TLS error\)"):
        call_service.delay("stub_tls_untrusted", "echo", {"key": key}).get(timeout=20)
    assert tls_stub.hits_for(key) == []  # refused at the handshake: no request was sent

    out = call_service.delay("stub_tls", "echo", {"key": key}).get(timeout=20)
    assert out["status"] == "succeeded" and out["data"]["path"] == f"/echo/{key}"
    assert len(tls_stub.hits_for(key)) == 1


def test_headers_go_with_every_request_and_one_from_the_environment_is_kept_out_of_the_ledger(
    worker: Any, stub: Stub, key: str
) -> None:
    # stub_headerkey: headers: {X-Tenant-Token: "${HEADER_TOKEN}", X-Plain: plain}; the stub
    # echoes nothing of the headers, so answer with them as a leaky upstream would.
    stub.plan(key, Reply(body={"seen": f"X-Tenant-Token: {HEADER_TOKEN}"}))
    out = call_service.delay("stub_headerkey", "echo", {"key": key}).get(timeout=20)
    (hit,) = stub.hits_for(key)
    assert hit.headers["x-plain"] == "plain"
    assert hit.headers["x-tenant-token"] == HEADER_TOKEN
    assert hit.headers["user-agent"] == http.USER_AGENT
    job = reads.get_job(out["job_id"])
    for secret in (TOKEN, HEADER_TOKEN):
        assert secret not in json.dumps(job, default=str) and secret not in json.dumps(out)


def test_a_default_in_the_services_file_stands_where_its_variable_is_unset(
    worker: Any, stub: Stub, key: str
) -> None:
    # stub_defaults: base_url ${STUB_URL:-http://127.0.0.1:1} (set: the stub, not the default),
    # X-Default: ${CLAIMS_NEVER_SET:-fallback} and timeout: ${CLAIMS_NEVER_SET:-3} (unset).
    assert "CLAIMS_NEVER_SET" not in os.environ
    svc = get_services()["stub_defaults"]
    assert isinstance(svc, HttpService) and svc.base_url == stub.url and svc.timeout == 3.0
    out = call_service.delay("stub_defaults", "echo", {"key": key}).get(timeout=20)
    assert out["status"] == "succeeded"
    (hit,) = stub.hits_for(key)
    assert hit.headers["x-default"] == "fallback"
