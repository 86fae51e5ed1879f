"""The MCP server, driven by the official SDK's own client over stdio and Streamable HTTP, with a
real worker behind it and the loopback stub upstream."""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import requests
from conftest import free_port
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from procs import BIN, env_with, running, wait_for
from stub import Reply, Stub

from integrations.tools.mcp_server import token_hash

pytestmark = pytest.mark.usefixtures("worker")
ECHO, CREATE = "tools_stub__echo", "tools_stub__create"
TOKENS = {"helper": "mcp_" + secrets.token_urlsafe(32), "writer": "mcp_" + secrets.token_urlsafe(32)}


def payload(result: Any) -> dict[str, Any]:
    return dict(json.loads(result.content[0].text))


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``integrations mcp --http`` as a process, with a tokens file of hashes."""
    folder = tmp_path_factory.mktemp("mcp")
    tokens = folder / "tokens"
    tokens.write_text(
        "# agent tokens, hashed\n" + "".join(f"{token_hash(t)} {a}\n" for a, t in TOKENS.items())
    )
    port = free_port()
    log = folder / "mcp.log"
    env = env_with(MCP_PORT=port, MCP_TOKENS_FILE=tokens, MCP_WAIT=1)
    with running([str(BIN / "integrations"), "mcp", "--http"], env, log):
        url = f"http://127.0.0.1:{port}/mcp"
        wait_for(lambda: requests.get(url, timeout=1).status_code == 401, 30, "the MCP server", log)
        yield url, log


def over_http(url: str, token: str | None, body: Callable[[Client], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with create_mcp_http_client(headers=headers) as http:
            with anyio.fail_after(60):
                async with Client(streamable_http_client(url, http_client=http)) as client:
                    return await body(client)

    return anyio.run(main)


def over_stdio(agent: str, body: Callable[[Client], Awaitable[Any]]) -> Any:
    params = StdioServerParameters(
        command=str(BIN / "integrations"), args=["mcp", "--agent", agent], env={**os.environ, "MCP_WAIT": "1"}
    )

    async def main() -> Any:
        with anyio.fail_after(60):
            async with Client(params) as client:
                return await body(client)

    return anyio.run(main)


async def session(client: Client, key: str) -> dict[str, Any]:
    """What an agent does: list, call, call a slow one, ask after it, call one it may not."""
    listed = [t.name for t in (await client.list_tools()).tools]
    done = await client.call_tool(ECHO, {"key": key, "q": "hi"})
    slow = await client.call_tool(ECHO, {"key": key + "-slow"})
    job_id = payload(slow)["job_id"]
    status = None
    for _ in range(80):  # bounded: the slow reply takes 3 s
        status = await client.call_tool("job_status", {"job_id": job_id})
        if payload(status)["status"] == "succeeded":
            break
        await anyio.sleep(0.25)
    refused = await client.call_tool(CREATE, {"key": key, "body": {"title": "t"}})
    bad = await client.call_tool(ECHO, {"key": key, "n": -1})
    return {"listed": listed, "done": done, "slow": slow, "status": status, "refused": refused, "bad": bad}


def check_session(out: dict[str, Any], stub: Stub, key: str) -> None:
    assert out["listed"] == [ECHO, "job_status"]
    assert not out["done"].is_error and payload(out["done"])["data"]["query"] == {"q": ["hi"]}
    slow = payload(out["slow"])
    assert (
        not out["slow"].is_error
        and slow["status"] in ("queued", "running")
        and "job_status" in slow["message"]
    )
    assert (
        payload(out["status"])["status"] == "succeeded"
        and payload(out["status"])["data"]["path"] == f"/echo/{key}-slow"
    )
    assert (
        out["refused"].is_error and "no tool named 'tools_stub__create'" in payload(out["refused"])["error"]
    )
    assert out["bad"].is_error and "n: fails minimum" in payload(out["bad"])["error"]
    assert len(stub.hits_for(key)) == 1 and len(stub.hits_for(key + "-slow")) == 1


def test_stdio_list_call_slow_job_and_refusal(stub: Stub, key: str) -> None:
    stub.plan(key + "-slow", Reply(delay=3))
    check_session(over_stdio("helper", lambda c: session(c, key)), stub, key)


def test_http_list_call_slow_job_and_refusal(http_server: tuple[str, Path], stub: Stub, key: str) -> None:
    url, _ = http_server
    stub.plan(key + "-slow", Reply(delay=3))
    check_session(over_http(url, TOKENS["helper"], lambda c: session(c, key)), stub, key)


def test_http_jobs_are_the_agents_own(http_server: tuple[str, Path], stub: Stub, key: str) -> None:
    from integrations.ledger import reads

    url, _ = http_server

    async def write(client: Client) -> Any:
        return await client.call_tool(CREATE, {"key": key, "body": {"title": "t"}})

    written = payload(over_http(url, TOKENS["writer"], write))
    job = reads.get_job(written["job_id"])
    assert job is not None and job["agent"] == "writer"  # attributed to the token's agent

    async def peek(client: Client) -> Any:
        return await client.call_tool("job_status", {"job_id": written["job_id"]})

    other = over_http(url, TOKENS["helper"], peek)
    assert other.is_error and payload(other)["error"] == "no job with this id was submitted by this agent"


@pytest.mark.parametrize("token", [None, "mcp_wrong-token-value"])
def test_http_refuses_a_missing_or_unknown_token_and_logs_no_token(
    http_server: tuple[str, Path], token: str | None
) -> None:
    url, log = http_server

    async def listing(client: Client) -> Any:
        return await client.list_tools()

    # The SDK's client gets no session: its first request is answered 401.
    with pytest.raises(BaseExceptionGroup) as refused:
        over_http(url, token, listing)
    assert refused.group_contains(MCPError, match="Server returned an error response")
    reply = requests.post(
        url, json={}, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=5
    )
    assert reply.status_code == 401 and reply.headers["www-authenticate"].startswith("Bearer")
    time.sleep(0.3)
    text = log.read_text()
    assert ("unknown bearer token" if token else "no bearer token") in text
    assert "mcp_wrong-token-value" not in text and all(t not in text for t in TOKENS.values())


def test_http_refuses_a_foreign_origin_or_host(http_server: tuple[str, Path]) -> None:
    url, log = http_server
    auth = {"Authorization": f"Bearer {TOKENS['helper']}", "Content-Type": "application/json"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    evil = requests.post(url, json=body, headers={**auth, "Origin": "http://evil.example"}, timeout=5)
    assert evil.status_code == 403
    rebound = requests.post(url, json=body, headers={**auth, "Host": "evil.example:80"}, timeout=5)
    assert rebound.status_code == 421
    assert "Origin not allowed" in log.read_text()


def test_tokens_file_keeps_hashes_only(tmp_path: Path) -> None:
    from procs import cli

    path = tmp_path / "tokens"
    out = cli("mcp-token", "helper", "--file", str(path))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("mcp_") and token not in path.read_text()
    assert path.read_text() == f"{token_hash(token)} helper\n" and (path.stat().st_mode & 0o777) == 0o600


def test_http_reads_the_tokens_file_again_when_it_changes(http_server: tuple[str, Path]) -> None:
    url, log = http_server
    tokens = log.parent / "tokens"
    original = tokens.read_text()
    fresh = "mcp_" + uuid.uuid4().hex

    def status(token: str) -> int:
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
        return requests.post(url, json=body, headers=headers, timeout=5).status_code

    assert status(fresh) == 401
    try:
        tokens.write_text(original + f"{token_hash(fresh)} helper\n")  # integrations mcp-token does this
        assert status(fresh) != 401
        tokens.write_text(original)  # the line removed: the token is revoked, no restart
        assert status(fresh) == 401
        assert status(TOKENS["helper"]) != 401
        tokens.write_text("not a tokens file\n")  # a botched edit admits no one, and says so
        assert status(TOKENS["helper"]) == 401
        assert "MCP tokens file not read" in log.read_text()
    finally:
        tokens.write_text(original)
    assert status(TOKENS["helper"]) != 401
