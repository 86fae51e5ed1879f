"""Security: credentials stay with their service's origin and out of everything stored, logged or
shown; requests cannot be steered to other hosts, paths or private addresses.

Two loopback servers play the parts: the stub on 127.0.0.1 (the service) and another on
127.0.0.2 (somewhere else). Each test here failed on the code before the hardening.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TOKEN
from stub import Reply, Stub

from integrations import http, ssrf
from integrations.errors import PermanentError
from integrations.ledger import jobs as ledger
from integrations.services.rest import RestService
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Stub]:
    """Another origin: a server on 127.0.0.2."""
    server = Stub(host="127.0.0.2").start()
    yield server
    server.stop()


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
    job = ledger.get_job(r.id)
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
    from integrations.services import Attempt

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
