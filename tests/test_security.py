"""Security: credentials stay with their service's origin and out of everything stored, logged or
shown; requests cannot be steered to other hosts, paths or private addresses.

Two loopback servers play the parts: the stub on 127.0.0.1 (the service) and another on
127.0.0.2 (somewhere else). Each test here failed on the code before the hardening.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import redis
import requests
from celery.signals import before_task_publish
from conftest import BOT_TOKEN, GH_SECRET, HEADER_TOKEN, IMAP_PASSWORD, REDIS_URL, TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import cli, env_with
from sqlalchemy import func, select
from stub import Reply, Stub

from integrations import http, ssrf
from integrations.config import Settings
from integrations.errors import ConfigError, InvalidParams, PermanentError, TransientError
from integrations.jobs import resolve
from integrations.ledger import deliveries, reads
from integrations.ledger import jobs as ledger
from integrations.ledger.db import get_engine
from integrations.ledger.models import Job, JobStatus, utcnow
from integrations.services import Attempt, load_services
from integrations.services.rest import RestService
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Stub]:
    """Another origin: a server on 127.0.0.2."""
    server = Stub(host="127.0.0.2").start()
    yield server
    server.stop()


@pytest.fixture
def published() -> Iterator[list[Any]]:
    """Every message published while the test runs."""
    seen: list[Any] = []

    def record(sender: str, body: Any, **_: Any) -> None:
        seen.append((sender, body))

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def job_count() -> int:
    with get_engine().connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Job)).scalar_one())


def credentials_in(hit: Any) -> list[str]:
    """Where a request carried the test token: header names, or ``query``."""
    found = [name for name, value in hit.headers.items() if TOKEN in value]
    if any(TOKEN in v for values in hit.query.values() for v in values):
        found.append("query")
    if "authorization" in hit.headers:
        found.append("authorization")
    return found


# ------------------------------------------------------------------------------------------------
# 1. Redirects
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["stub", "stub_apikey", "stub_basic", "stub_headerkey"])
def test_a_redirect_to_another_origin_fails_the_job_and_carries_no_credential_there(
    service: str, stub: Stub, elsewhere: Stub, key: str
) -> None:
    stub.plan(key, Reply(status=302, headers={"Location": f"{elsewhere.url}/echo/{key}"}))
    r = call_service.delay(service, "echo", {"key": key})
    with pytest.raises(PermanentError, match="redirected to another origin"):
        r.get(timeout=20)
    assert elsewhere.hits_for(key) == []
    (asked,) = stub.hits_for(key)
    assert credentials_in(asked)  # the service's own origin did get them
    job = reads.get_job(r.id)
    assert job is not None and job["status"] == "failed" and job["attempts"] == 1


@pytest.mark.parametrize("service", ["stub_apikey", "stub_headerkey"])
def test_a_redirect_within_the_origin_is_followed_with_the_credentials(
    service: str, stub: Stub, key: str
) -> None:
    stub.plan(key, Reply(status=307, headers={"Location": f"/echo/{key}/moved"}))
    out = call_service.delay(service, "echo", {"key": key}).get(timeout=20)
    assert out["status"] == "succeeded"
    first, moved = stub.hits_for(key)
    assert moved.path == f"/echo/{key}/moved"
    assert credentials_in(moved) == credentials_in(first) != []


def test_localhost_is_another_origin_than_127_0_0_1(stub: Stub, key: str) -> None:
    port = stub.server_address[1]
    stub.plan(key, Reply(status=301, headers={"Location": f"http://localhost:{port}/echo/{key}-2"}))
    with pytest.raises(PermanentError, match="another origin"):
        call_service.delay("stub_headerkey", "echo", {"key": key}).get(timeout=20)
    assert stub.hits_for(key + "-2") == []


@pytest.fixture(scope="module")
def hop_servers() -> Iterator[tuple[Stub, Stub]]:
    """``stub_hop``'s servers on the same port: the one it may reach (127.0.0.2) and one on
    loopback (127.0.0.1) that its requests must never reach."""
    port = int(os.environ["HOP_PORT"])
    allowed, loopback = Stub(host="127.0.0.2", port=port).start(), Stub(host="127.0.0.1", port=port).start()
    yield allowed, loopback
    allowed.stop()
    loopback.stop()


def resolve_hop_test(monkeypatch: pytest.MonkeyPatch, answer: Callable[[], str]) -> None:
    """Make the name ``hop.test`` resolve to ``answer()`` at each lookup, in this process (and
    so in the session worker's threads)."""
    real = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real(answer() if host == "hop.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


# The redirect answers close the connection, so the next hop opens (and judges) a new one.
def moved(key: str) -> Reply:
    return Reply(status=307, headers={"Location": f"/echo/{key}/moved", "Connection": "close"})


def test_a_guarded_service_follows_a_redirect_within_its_origin_to_an_allowed_address(
    monkeypatch: pytest.MonkeyPatch, hop_servers: tuple[Stub, Stub], key: str
) -> None:
    allowed, loopback = hop_servers
    resolve_hop_test(monkeypatch, lambda: "127.0.0.2")
    allowed.plan(key, moved(key))
    out = call_service.delay("stub_hop", "echo", {"key": key}).get(timeout=20)
    assert out["status"] == "succeeded" and out["data"]["path"] == f"/echo/{key}/moved"
    assert [h.path for h in allowed.hits_for(key)] == [f"/echo/{key}", f"/echo/{key}/moved"]
    assert loopback.hits_for(key) == []


def test_the_guard_judges_each_redirect_hop_and_refuses_one_that_resolves_to_loopback(
    monkeypatch: pytest.MonkeyPatch, hop_servers: tuple[Stub, Stub], key: str
) -> None:
    # Same origin, so the redirect is followed; but by the second hop hop.test resolves to
    # 127.0.0.1, which the service may not reach: refused before anything is sent there.
    allowed, loopback = hop_servers
    resolve_hop_test(monkeypatch, lambda: "127.0.0.1" if allowed.hits_for(key) else "127.0.0.2")
    allowed.plan(key, moved(key))
    r = call_service.delay("stub_hop", "echo", {"key": key})
    with pytest.raises(ssrf.BlockedAddress, match=r"hop\.test: it resolves to a non-public address"):
        r.get(timeout=20)
    assert [h.path for h in allowed.hits_for(key)] == [f"/echo/{key}"]
    assert loopback.hits_for(key) == []
    job = reads.get_job(r.id)
    assert job is not None and (job["status"], job["attempts"]) == ("failed", 1)


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}", "http://[::ffff:127.0.0.1]:{port}"])
def test_a_redirect_to_a_private_address_is_refused_and_never_reached(
    monkeypatch: pytest.MonkeyPatch, hop_servers: tuple[Stub, Stub], key: str, target: str
) -> None:
    allowed, loopback = hop_servers
    resolve_hop_test(monkeypatch, lambda: "127.0.0.2")
    location = target.format(port=loopback.server_address[1]) + f"/echo/{key}"
    allowed.plan(key, Reply(status=302, headers={"Location": location}))
    with pytest.raises(PermanentError, match="redirected to another origin"):
        call_service.delay("stub_hop", "echo", {"key": key}).get(timeout=20)
    assert len(allowed.hits_for(key)) == 1 and loopback.hits_for(key) == []


# ------------------------------------------------------------------------------------------------
# 8. The SSRF guard
# ------------------------------------------------------------------------------------------------


def service_at(base_url: str, **fields: Any) -> RestService:
    return RestService.model_validate(
        {
            "name": "probe",
            "kind": "rest",
            "base_url": base_url,
            "timeout": 2,
            "operations": {"echo": {"method": "GET", "path": "/echo/{key}"}},
            **fields,
        }
    )


def send(svc: RestService, key: str) -> http.Response:
    op = svc.catalog()["echo"]
    return svc.send(svc.request(op, {"key": key}, Attempt("job")))


def test_the_connection_goes_to_the_address_the_guard_approved_not_a_second_answer(
    monkeypatch: pytest.MonkeyPatch, elsewhere: Stub, key: str
) -> None:
    # A rebinding name: its first answer is an allowed address, every later one is loopback,
    # where a server waits on the same port for requests that must never reach it.
    port = elsewhere.server_address[1]
    target = Stub(host="127.0.0.1", port=port).start()
    try:
        real = socket.getaddrinfo
        answers = iter(["127.0.0.2"])

        def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "rebind.test":
                return real(next(answers, "127.0.0.1"), *args, **kwargs)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        svc = service_at(f"http://rebind.test:{port}", allowed_networks=["127.0.0.2/32"])
        assert send(svc, key).status_code == 200
        assert target.hits_for(key) == []
        assert len(elsewhere.hits_for(key)) == 1
        # The next connection (a fresh session) resolves to loopback: refused, nothing sent.
        http._reset_sessions_in_child()
        with pytest.raises(ssrf.BlockedAddress):
            send(svc, key + "b")
        assert target.hits_for(key + "b") == []
    finally:
        target.stop()


def nat64_local(v4: str) -> str:
    """``v4`` in the local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215, RFC 6052 2.2)."""
    v = int(ipaddress.IPv4Address(v4))
    return str(ipaddress.IPv6Address((0x0064FF9B0001 << 80) | ((v >> 16) << 64) | ((v & 0xFFFF) << 40)))


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # shared address space
        ("224.0.0.1", False),  # multicast: Python calls it global
        ("ff02::1", False),
        ("240.0.0.1", False),  # reserved
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:127.0.0.1", False),  # mapped
        ("::127.0.0.1", False),  # compatible
        ("::ffff:0:7f00:1", False),  # SIIT
        ("::ffff:0:808:808", True),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),
        (nat64_local("127.0.0.1"), False),
        (nat64_local("8.8.8.8"), True),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:808:808::", True),
        ("fe80::1", False),
        ("fec0::1", False),  # site-local
        ("3fff::1", False),  # documentation, RFC 9637
    ],
)
def test_addresses_are_judged_by_the_ipv4_they_carry_and_multicast_and_reserved_are_refused(
    address: str, public: bool
) -> None:
    assert ssrf.allowed(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("host", ["[::ffff:127.0.0.1]", "[::ffff:0:7f00:1]", "[2002:7f00:1::]", "127.1"])
def test_a_guarded_service_cannot_reach_loopback_spelled_otherwise(stub: Stub, host: str, key: str) -> None:
    port = stub.server_address[1]
    with pytest.raises(ssrf.BlockedAddress):
        send(service_at(f"http://{host}:{port}"), key)
    assert stub.hits_for(key) == []


def test_a_scoped_link_local_address_is_a_permanent_refusal() -> None:
    with pytest.raises(ssrf.BlockedAddress, match="not a public address"):
        ssrf.resolve("fe80::1%lo", 80)
    svc = service_at("http://[fe80::1%25lo]:8080")
    with pytest.raises(ssrf.BlockedAddress):
        send(svc, "k")


# ------------------------------------------------------------------------------------------------
# 2, 4. Nothing Celery stores or emits, nothing the ledger keeps or the CLI shows, holds a credential
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def task_events(app: Any) -> Iterator[list[dict[str, Any]]]:
    """Every event the workers send while the block runs (what Flower sees)."""
    seen: list[dict[str, Any]] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        # The receiver consumes once a warm-up job's events come through.
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            call_service.delay("stub", "echo", {"key": "warm-up"}).get(timeout=10)
            time.sleep(0.5)
        assert seen, "no task event within 20 s"
        try:
            yield seen
        finally:
            time.sleep(1.0)  # the job's last events
            receiver.should_stop = True
            thread.join(timeout=5)


def test_a_failed_job_leaves_no_credential_in_the_result_backend_or_task_events(app: Any, key: str) -> None:
    # urllib3's error for a refused connection names the URL, query string (api_key) included.
    with task_events(app) as events:
        r = call_service.delay("apikey_closed", "echo", {"key": key})
        with pytest.raises(TransientError, match="connection refused"):
            r.get(timeout=20)
    stored = redis.Redis.from_url(REDIS_URL).get(f"celery-task-meta-{r.id}")
    assert stored is not None and b"TransientError" in stored
    assert TOKEN.encode() not in stored
    failed = [e for e in events if e.get("type") == "task-failed" and e.get("uuid") == r.id]
    assert failed and "connection refused" in failed[0]["exception"]
    assert TOKEN not in json.dumps(events)
    job = reads.get_job(r.id, with_attempts=True)
    assert job is not None and TOKEN not in json.dumps(job, default=str)


def test_an_upstream_that_echoes_credentials_does_not_put_them_in_the_ledger_or_the_result(
    stub: Stub, key: str
) -> None:
    # The stub echoes the query (api_key) in its body; another answer quotes the bearer token.
    echoed = call_service.delay("stub_apikey", "echo", {"key": key}).get(timeout=20)
    assert echoed["data"]["query"] == {"api_key": ["[REDACTED]"]}
    stub.plan(key, Reply(body={"you_sent": f"Authorization: Bearer {TOKEN}", "url_safe": quote(TOKEN)}))
    quoted = call_service.delay("stub", "echo", {"key": key}).get(timeout=20)
    assert TOKEN not in json.dumps(quoted)
    for job_id in (echoed["job_id"], quoted["job_id"]):
        job = reads.get_job(job_id, with_attempts=True)
        assert job is not None and "[REDACTED]" in (job["response_excerpt"] or "")
        assert TOKEN not in json.dumps(job, default=str)
        shown = cli("job", job_id)
        assert shown.returncode == 0 and "[REDACTED]" in shown.stdout and TOKEN not in shown.stdout
    stored = redis.Redis.from_url(REDIS_URL).get(f"celery-task-meta-{echoed['job_id']}")
    assert stored is not None and TOKEN.encode() not in stored


# ------------------------------------------------------------------------------------------------
# 5, 12. The services file: errors never echo a value; URLs carry no credentials; bad forms refused
# ------------------------------------------------------------------------------------------------

SECRET = "s3cr3t-" + uuid.uuid4().hex
BASE = """
services:
  api:
    base_url: https://api.example.com
    auth: {type: bearer, token: "${T_SEC}"}
    operations:
      get: {method: GET, path: "/things/{id}"}
"""


def load_text(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "services.yaml"
    path.write_text(text)
    return load_services(path, Settings())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("base_url: https://api.example.com", "kind: ${T_SEC}\n    base_url: https://x.example"),
            "kind: unknown kind",
        ),
        (("type: bearer", "type: ${T_SEC}"), "auth: unknown type; expected one of"),
        (('path: "/things/{id}"', 'path: "/things/{${T_SEC}}"'), "plain {name} placeholders only"),
        (('path: "/things/{id}"', 'path: "/things/{id:>99999999}"'), "plain {name} placeholders only"),
        (('path: "/things/{id}"', 'path: "/things/{0}"'), "plain {name} placeholders only"),
        (('path: "/things/{id}"', 'path: "/things/{id.__class__}"'), "plain {name} placeholders only"),
        (("method: GET", "method: ${T_SEC}"), "operations.get.method"),
        (("method: GET", "method: GET, query: {q: '${T_SEC}'}"), "unknown type; use one of"),
        (
            ("base_url: https://api.example.com", "base_url: https://api.example.com\n    timeout: ${T_SEC}"),
            ".timeout",
        ),
        (("base_url: https://api.example.com", "base_url: ${T_SEC}"), "base_url"),
        (
            ("https://api.example.com", "https://bot:${T_SEC}@api.example.com"),
            "must not contain a user name or password",
        ),
        (
            ("https://api.example.com", "https://api.example.com/?key=${T_SEC}"),
            "must not have a query string",
        ),
        (("operations:", "health: {operation: '${T_SEC}'}\n    operations:"), "health.operation: not one of"),
        (("operations:", "rate_limit: '${T_SEC}'\n    operations:"), "rate_limit: must look like"),
        (("operations:", "rate_limit: 0/s\n    operations:"), "rate_limit: must be above zero"),
    ],
)
def test_a_secret_in_the_wrong_field_is_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], expected: str
) -> None:
    monkeypatch.setenv("T_SEC", SECRET)
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, BASE.replace(*change))
    assert expected in str(e.value)
    assert SECRET not in str(e.value) and "s3cr3t" not in str(e.value)


def test_a_deeply_nested_services_file_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_text(tmp_path, "services:\n  x: " + "[" * 5000 + "]" * 5000 + "\n")


def test_integrations_services_never_prints_a_secret_and_lists_webhooks_and_mailboxes(
    tmp_path: Path,
) -> None:
    out = cli("services")
    assert out.returncode == 0, out.stderr
    assert "gh (github)" in out.stdout and "std (standard)" in out.stdout
    assert "mail_repeat (127.0.0.1:" in out.stdout and "mail_off (" in out.stdout and "disabled" in out.stdout
    for secret in (TOKEN, GH_SECRET, IMAP_PASSWORD):
        assert secret not in out.stdout
    path = tmp_path / "services.yaml"
    path.write_text(BASE.replace("https://api.example.com", "https://bot:${T_SEC}@api.example.com"))
    refused = cli("services", env=env_with(SERVICES_FILE=path, T_SEC=SECRET))
    assert refused.returncode == 2 and SECRET not in refused.stdout + refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr


# ------------------------------------------------------------------------------------------------
# 7, 11. Params: no value leaves the base path or changes the origin; bounded; JSON only
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [".", "..", "%2e", "%2E%2e", ".%2E", "%252e%252e"])
def test_dot_segments_in_a_path_parameter_are_refused_at_submit(
    value: str, published: list[Any], stub: Stub
) -> None:
    before = job_count()
    with pytest.raises(InvalidParams, match=re.escape("id: must not be or contain a '.' or '..' segment")):
        call_service.delay("stub_based", "item", {"id": value})
    assert job_count() == before and published == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ident=st.text(min_size=1, max_size=40).filter(lambda v: not _is_dot(v)),
    q=st.text(max_size=40),
    tags=st.lists(st.text(max_size=10), max_size=3),
)
def test_no_parameter_value_changes_the_origin_or_leaves_the_base_path(
    ident: str, q: str, tags: list[str]
) -> None:
    svc, op = resolve("stub_based", "item")
    assert isinstance(svc, RestService)
    params = op.validate_params({"id": ident, "q": q, "tags": tags})
    req = svc.request(op, params, Attempt("job"))
    sent = requests.Request(req.method, req.url, params=req.params).prepare()
    base, url = urlsplit(svc.base_url), urlsplit(sent.url or "")
    assert (url.scheme, url.netloc) == (base.scheme, base.netloc)
    assert url.path.startswith("/api/v1/tenant42/items/") and url.path.count("/") == 5


def _is_dot(value: str) -> bool:
    from integrations.services.rest import _dot_segment

    return _dot_segment(value)


def test_tricky_path_values_reach_the_server_inside_the_base_path(stub: Stub, key: str) -> None:
    for value in (f"{key}?x=1#f", f"{key}/a b", f"{key};p=1", f"{key}..x"):
        out = call_service.delay("stub_based", "item", {"id": value}).get(timeout=20)
        assert out["status"] == "succeeded"
    paths = [h.path for h in stub.hits if h.path.startswith("/api/v1/tenant42/items/") and key in h.path]
    assert len(paths) == 4 and all(p.count("/") == 5 for p in paths)


def test_params_larger_than_params_max_bytes_are_refused_and_write_nothing(published: list[Any]) -> None:
    before = job_count()
    with pytest.raises(InvalidParams, match="larger than 262144 bytes"):
        call_service.delay("stub", "create", {"key": "k", "title": "x" * 300_000})
    assert job_count() == before and published == []


@pytest.mark.parametrize("tags", [[object()], [float("nan")], [{1: set()}]])
def test_params_that_are_not_json_are_invalid_params_not_a_ledger_error(
    tags: list[Any], published: list[Any]
) -> None:
    before = job_count()
    with pytest.raises(InvalidParams, match="params must be JSON values"):
        call_service.delay("stub", "create", {"key": "k", "title": "t", "tags": tags})
    assert job_count() == before and published == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinities_are_refused_even_for_a_text_parameter(value: float, published: list[Any]) -> None:
    before = job_count()
    with pytest.raises(InvalidParams, match="params must be JSON values"):
        call_service.delay("stub", "create", {"key": value, "title": "t"})  # key: a string
    assert job_count() == before and published == []


def test_an_answer_nested_too_deeply_fails_the_job_in_one_line(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(body=b"[" * 5000 + b"]" * 5000))  # sent as application/json
    with pytest.raises(PermanentError, match=r"^the answer's JSON is nested deeper than 128 levels$"):
        call_service.delay("stub", "echo", {"key": key}).get(timeout=20)


def test_the_cli_reads_each_value_as_its_parameter_is_declared(stub: Stub, key: str) -> None:
    # key is a string: "1e3" stays text (JSON would read 1000.0); n is an integer.
    out = cli("call", "stub", "echo", f"key={key}1e3", "n=7", "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data"]["query"] == {"n": ["7"]}
    assert [h.path for h in stub.hits_for(key + "1e3")] == [f"/echo/{key}1e3"]
    number_as_text = cli("call", "stub", "echo", "key=1e3", "--wait", "--timeout", "30")
    assert number_as_text.returncode == 0, number_as_text.stderr
    assert stub.hits_for("1e3")


# ------------------------------------------------------------------------------------------------
# 9. Outgoing webhook endpoints are validated when added
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:70000/hook", "malformed host or port"),
        ("http://127.0.0.1:0/hook", "port out of range"),
        (f"http://agent:{SECRET}@127.0.0.1/hook", "must not contain a user name or password"),
        ("http://127.0.0.1/hook\r\nX-Injected: 1", "whitespace or control characters"),
        ("http://127.0.0.1/a hook", "whitespace or control characters"),
        ("http://[::1", "malformed host or port"),
        ("http://10.0.0.1/hook", "not a public address"),
        ("http://[::ffff:10.0.0.1]/hook", "not a public address"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
        ("ftp://example.com/hook", "must be http:// or https://"),
    ],
    ids=lambda v: v.replace(SECRET, "SECRET") if isinstance(v, str) else None,  # one id in every process
)
def test_an_endpoint_that_could_never_be_delivered_to_is_refused_when_added(url: str, expected: str) -> None:
    before = len(deliveries.list_endpoints())
    out = cli("endpoints", "add", url, "--events", "*")
    assert out.returncode == 2
    assert expected in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert SECRET not in out.stderr and "Traceback" not in out.stderr
    assert len(deliveries.list_endpoints()) == before


# ------------------------------------------------------------------------------------------------
# What an outsider's review of the hardening found, each reproduced
# ------------------------------------------------------------------------------------------------

BASIC = base64.b64encode(f"agent:{TOKEN}".encode()).decode()
DEEP: Any = "x"
for _ in range(34):
    DEEP = [DEEP]
A_SERVICE = "services:\n  a: {base_url: 'https://a.example', operations: {x: {path: /x}}}\n"
DEEP_SCHEMA = "{type: array, items: " * 150 + "{}" + "}" * 150


def key_() -> str:
    return str(uuid.uuid4())


@pytest.mark.parametrize("value", ["../../admin", "x/../../v2", "a\\..\\b", "..%5Cx", "%2e%2e%2fx", "./x"])
def test_a_path_value_that_a_decoding_proxy_would_resolve_out_of_the_base_path_is_refused(
    value: str, published: list[Any]
) -> None:
    # Sent quoted (..%2F..%2Fadmin), but nginx or Go's ServeMux decode %2F and resolve the dots.
    before = job_count()
    with pytest.raises(InvalidParams, match=r"id: must not be or contain a '\.' or '\.\.' segment"):
        call_service.delay("stub_based", "item", {"id": value})
    assert job_count() == before and published == []


def test_a_path_value_with_slashes_but_no_dot_segment_goes_quoted_whole(stub: Stub, key: str) -> None:
    out = call_service.delay("stub_based", "item", {"id": f"{key}/group/project"}).get(timeout=20)
    assert out["status"] == "succeeded"
    assert [h.path for h in stub.hits if key in h.path] == [f"/api/v1/tenant42/items/{key}%2Fgroup%2Fproject"]


def test_an_answer_holding_nul_is_recorded_not_left_running(stub: Stub, key: str) -> None:
    # PostgreSQL refuses NUL in text: the job must still end, recorded, and not be run again.
    stub.plan(key, Reply(body=b'{"x": "a\\u0000b"}'), Reply(body=b"raw\x00nul"))
    first = call_service.delay("stub", "echo", {"key": key}).get(timeout=20)
    second = call_service.delay("stub", "echo", {"key": key}).get(timeout=20)
    assert first["status"] == second["status"] == "succeeded"
    job = reads.get_job(second["job_id"])
    assert job is not None and job["status"] == "succeeded" and "\ufffd" in (job["response_excerpt"] or "")
    stub.plan(key, Reply(status=400, reason="Bad\x00Request"))
    failed = call_service.delay("stub", "echo", {"key": key})
    with pytest.raises(PermanentError):
        failed.get(timeout=20)
    row = reads.get_job(failed.id)
    assert row is not None and row["status"] == "failed" and row["attempts"] == 1
    assert len(stub.hits_for(key)) == 3


def test_an_outcome_recorded_late_never_overwrites_a_newer_attempt(stub: Stub, key: str) -> None:
    job_id, _ = ledger.create_job("stub", "echo", {"key": key}, None)
    first = ledger.claim(job_id)
    assert first is not None
    # Attempt 1's outcome is held back (the ledger was away); the job is run again meanwhile.
    with get_engine().begin() as conn:
        conn.execute(ledger.jobs.update().where(ledger.jobs.c.id == job_id).values(status="retrying"))
    second = ledger.claim(job_id)
    assert second is not None and second.attempt == 2
    ledger.write_attempt(
        second, status=JobStatus.SUCCEEDED, started_at=utcnow(), status_code=200, latency_ms=1.0,
        error=None, response_excerpt="ok",
    )  # fmt: skip
    ledger.write_attempt(
        first, status=JobStatus.RETRYING, started_at=utcnow(), status_code=502, latency_ms=1.0,
        error="HTTP 502", response_excerpt=None,
    )  # fmt: skip
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None and job["status"] == "succeeded" and job["status_code"] == 200
    assert [a["number"] for a in job["attempts_log"]] == [1, 2]


@pytest.mark.parametrize(
    ("reply", "service"),
    [
        # Basic auth echoed as the header it came in.
        (Reply(body={"seen": "Authorization: Basic " + BASIC}), "stub_basic"),
        # The reason phrase, which is no part of the body.
        (Reply(status=400, reason=f"Bad token {TOKEN}"), "stub"),
        # JSON that escapes the token (PHP's \/, Java's \u003d): the raw bytes do not show it.
        (Reply(body=json.dumps({"seen": TOKEN}).replace("-", "\\u002d").encode()), "stub"),
        # A fixed header from ${VAR}, echoed in the reason.
        (Reply(status=400, reason=f"Bad tenant {HEADER_TOKEN}"), "stub_headerkey"),
    ],
)
def test_credentials_echoed_in_any_form_are_masked_in_the_ledger_result_and_cli(
    reply: Reply, service: str, stub: Stub, key: str
) -> None:
    stub.plan(key, reply)
    r = call_service.delay(service, "echo", {"key": key})
    try:
        shown = json.dumps(r.get(timeout=20))
    except PermanentError as e:
        shown = str(e)
    job = reads.get_job(r.id, with_attempts=True)
    stored = redis.Redis.from_url(REDIS_URL).get(f"celery-task-meta-{r.id}") or b""
    listing = cli("jobs", "--service", service, "--limit", "500").stdout + cli("job", r.id).stdout
    for secret in (TOKEN, HEADER_TOKEN):
        assert secret not in shown and secret.encode() not in stored
        assert secret not in json.dumps(job, default=str) and secret not in listing
    assert "[REDACTED]" in shown + json.dumps(job, default=str)


def test_a_token_inside_the_base_url_is_a_credential(stub: Stub, key: str) -> None:
    # The stub echoes the request's path, which holds the token.
    out = call_service.delay("stub_botpath", "echo", {"key": key}).get(timeout=20)
    assert out["data"]["path"] == f"/bot[REDACTED]/echo/{key}"
    assert [h.path for h in stub.hits if key in h.path] == [f"/bot{BOT_TOKEN}/echo/{key}"]
    services = cli("services")
    assert "stub_botpath (rest" in services.stdout and BOT_TOKEN not in services.stdout


def test_an_endpoint_url_is_listed_by_its_origin_only(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    secret_path = f"/services/T000/B000/{key}SlackPathSecret"
    out = cli("endpoints", "add", f"http://127.0.0.1:9{secret_path}?access_key={key}q", "--events", "x")
    assert out.returncode == 0, out.stderr
    listing = cli("endpoints", "list").stdout
    assert "http://127.0.0.1:9/…" in listing and "SlackPathSecret" not in listing


def test_json_numbers_json_does_not_allow_and_control_characters_in_ids_are_400(stub: Stub) -> None:
    from conftest import GH_SECRET as secret

    from integrations.config import get_settings, get_webhooks
    from integrations.webhooks.receiver import create_app
    from tasks.events import publish_event

    app = create_app(get_webhooks(), publish_event, get_settings().webhook_max_body_bytes)
    from asgi_server import serve

    with serve(app) as url:
        for body in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1e999}'):
            sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push", "X-GitHub-Delivery": key_()}
            r = requests.post(f"{url}/webhooks/gh", data=body, headers=headers, timeout=10)
            assert r.status_code == 400, (body, r.text)
        body = b"{}"
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push\x1b[31m", "X-GitHub-Delivery": "d"}
        r = requests.post(f"{url}/webhooks/gh", data=body, headers=headers, timeout=10)
        # A C0 control is not allowed in a header (RFC 9110 5.5): uvicorn's parser (httptools)
        # refuses the request before the app; a C1 control (obs-text) reaches the receiver's check.
        assert r.status_code == 400
        headers["X-GitHub-Event"] = "push\x9b31m"
        r = requests.post(f"{url}/webhooks/gh", data=body, headers=headers, timeout=10)
        assert r.status_code == 400 and "control character" in r.text


def test_a_receiver_missing_a_sources_secret_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(
        "services:\n  x: {base_url: 'https://x.example', operations: {a: {path: /a}}}\n"
        "webhooks:\n  gh: {type: github, secret: '${T_UNSET_HOOK_SECRET}'}\n"
    )
    out = cli("receiver", env=env_with(SERVICES_FILE=path, RECEIVER_PORT=1, T_UNSET_HOOK_SECRET=None))
    assert out.returncode == 2
    expected = "webhooks.gh.secret: environment variable T_UNSET_HOOK_SECRET is not set"
    assert out.stderr.strip().startswith(f"error: {expected} (nor T_UNSET_HOOK_SECRET_FILE)")


def test_cli_output_shows_control_characters_escaped(stub: Stub, key: str) -> None:
    stub.plan(key, Reply(status=400, reason="Bad \x1b[2J\x1b[31mRequest"))
    with pytest.raises(PermanentError):
        call_service.delay("stub", "echo", {"key": key}).get(timeout=20)
    listing = cli("jobs", "--status", "failed", "--service", "stub", "--limit", "500").stdout
    assert "\x1b" not in listing and "\\x1b[2J" in listing


@pytest.mark.parametrize(
    ("params", "key", "message"),
    [
        ({"key": "k", "title": "lone \ud800 surrogate"}, None, "valid Unicode text"),
        ({"key": "k", "title": "t", "tags": DEEP}, None, "nested deeper than 32"),
        ({"key": "k", "title": "t"}, "bad\x00key", "idempotency_key must be 1 to 255 printable characters"),
        ({"key": "k", "title": "t", "x" * 200: 1}, None, "x" * 40 + ": not a parameter"),
    ],
)
def test_more_bad_input_is_refused_at_submit_in_one_line(
    params: dict[str, Any], key: str | None, message: str, published: list[Any]
) -> None:
    before = job_count()
    with pytest.raises(InvalidParams) as e:
        call_service.delay("stub", "create", params, idempotency_key=key)
    assert message in str(e.value) and "x" * 41 not in str(e.value)
    assert job_count() == before and published == []


def test_the_cli_refuses_bad_numbers_and_deep_values_without_a_traceback() -> None:
    for args in (
        ("call", "stub", "echo", "key=k", "--wait", "--timeout", "-1"),
        ("jobs", "--limit", "-1"),
        ("call", "stub", "create", "key=k", "title=t", "tags=" + "[" * 5000 + "]" * 5000),
    ):
        out = cli(*args)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (A_SERVICE + "services:\n  b: {}\n", "'services' is given twice"),
        (
            A_SERVICE.replace("operations:", "headers: {'${T_SEC}': v}, operations:"),
            "may be a value only, not a key",
        ),
        (A_SERVICE.replace("{path: /x}", "{path: /x, query: {q: " + DEEP_SCHEMA + "}}"), "nested too deeply"),
    ],
)
def test_more_broken_services_files_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_text(tmp_path, text)


def test_a_malformed_redirect_is_a_permanent_error_not_an_internal_one(stub: Stub, key: str) -> None:
    port = stub.server_address[1]
    stub.plan(key, Reply(status=302, headers={"Location": f"http://127.0.0.1:{port} /x"}))
    stub.plan(key + "b", Reply(status=302, headers={"Location": "http://[::1/x"}))
    for k in (key, key + "b"):
        with pytest.raises(PermanentError, match="redirect"):
            call_service.delay("stub", "echo", {"key": k}).get(timeout=20)


# Secrets resolved where they are used
# ------------------------------------------------------------------------------------------------


def test_a_service_whose_token_this_process_lacks_fails_alone_naming_the_variable(
    stub: Stub, key: str
) -> None:
    # tests/services.yaml's stub_no_token takes ${CLAIMS_NEVER_SET}, set in no test process: the
    # worker, the receiver and Flower (started by other tests) load the file and run all the same.
    assert "CLAIMS_NEVER_SET" not in os.environ
    r = call_service.delay("stub_no_token", "echo", {"key": key})
    with pytest.raises(PermanentError) as e:
        r.get(timeout=20)
    assert str(e.value) == (
        "services.stub_no_token.auth.token: environment variable CLAIMS_NEVER_SET is not set "
        "(nor CLAIMS_NEVER_SET_FILE)"
    )
    assert stub.hits_for(key) == []
    job = reads.get_job(r.id)
    assert job is not None and (job["status"], job["attempts"]) == ("failed", 1)
    assert call_service.delay("stub", "echo", {"key": key}).get(timeout=20)["status"] == "succeeded"


def test_a_sqlite_file_is_made_private_but_the_folder_it_sits_in_is_left_alone(tmp_path: Path) -> None:
    # A ledger at /tmp/x.db must not take /tmp to 0700 (it did: every user's tmp was shut).
    from integrations.ledger.db import make_engine

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    engine = make_engine(f"sqlite:///{shared}/ledger.db")
    with engine.connect():
        pass
    engine.dispose()
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert (shared / "ledger.db").stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "fresh" / "ledger.db"
    make_engine(f"sqlite:///{fresh}").dispose()
    assert fresh.parent.stat().st_mode & 0o777 == 0o700
