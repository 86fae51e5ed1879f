"""The machine's RabbitMQ for the tests (``TEST_RABBITMQ_URL``, default guest on 127.0.0.1:5672).

Every test that runs on RabbitMQ gets a virtual host of its own, made before and deleted after
(its queues, messages and delayed-delivery queues with it): through the management plugin's
HTTP API when it is enabled, else with ``rabbitmqctl`` (which needs the node's Erlang cookie:
root, or the rabbitmq user). An unreachable RabbitMQ fails the test, naming what to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import requests

URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
MANAGEMENT_URL = os.environ.get("TEST_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")
_parts = urlsplit(URL)
HOST, PORT = _parts.hostname or "127.0.0.1", _parts.port or 5672
USER, PASSWORD = _parts.username or "guest", _parts.password or "guest"


def require() -> None:
    """Fail (never skip) when RabbitMQ does not accept connections."""
    try:
        socket.create_connection((HOST, PORT), timeout=3).close()
    except OSError as e:
        pytest.fail(
            f"RabbitMQ is not reachable at {HOST}:{PORT} ({e}); start it (.ci/run does,"
            " or /etc/init.d/rabbitmq-server start)",
            pytrace=False,
        )


def _api(method: str, path: str, body: Any = None) -> requests.Response | None:
    """A call to the management API, or ``None`` when the plugin is not there."""
    try:
        return requests.request(
            method, f"{MANAGEMENT_URL}/api/{path}", json=body, auth=(USER, PASSWORD), timeout=10
        )
    except requests.ConnectionError:
        return None


def _ctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("neither RabbitMQ's management API nor rabbitmqctl is available", pytrace=False)
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip()[-500:]}", pytrace=False)
    return out.stdout


def create(name: str) -> None:
    r = _api("PUT", f"vhosts/{quote(name, safe='')}")
    if r is not None:
        r.raise_for_status()
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        granted = _api("PUT", f"permissions/{quote(name, safe='')}/{quote(USER, safe='')}", perms)
        assert granted is not None
        granted.raise_for_status()
        return
    _ctl("add_vhost", name)
    _ctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")


def delete(name: str) -> None:
    r = _api("DELETE", f"vhosts/{quote(name, safe='')}")
    if r is None:
        _ctl("delete_vhost", name)
    elif r.status_code not in (204, 404):
        r.raise_for_status()


def queues(name: str) -> dict[str, dict[str, Any]]:
    """The queues of vhost ``name``: ``{queue: {"type": ..., "messages": ...}}``."""
    r = _api("GET", f"queues/{quote(name, safe='')}")
    if r is not None:
        r.raise_for_status()
        return {q["name"]: {"type": q.get("type"), "messages": q.get("messages", 0)} for q in r.json()}
    rows = json.loads(_ctl("list_queues", "-p", name, "name", "type", "messages", "--formatter", "json"))
    return {q["name"]: {"type": q["type"], "messages": q["messages"]} for q in rows}


def set_policy(vhost: str, policy: str, pattern: str, definition: dict[str, Any]) -> None:
    """A policy on the queues of ``vhost`` matching ``pattern`` (a regular expression)."""
    r = _api(
        "PUT",
        f"policies/{quote(vhost, safe='')}/{quote(policy, safe='')}",
        {"pattern": pattern, "definition": definition, "apply-to": "queues"},
    )
    if r is not None:
        r.raise_for_status()
        return
    _ctl("set_policy", "-p", vhost, "--apply-to", "queues", policy, pattern, json.dumps(definition))


@contextlib.contextmanager
def vhost() -> Iterator[tuple[str, str]]:
    """A fresh virtual host, deleted on exit: ``(name, its AMQP URL)``."""
    require()
    name = "integrations-test-" + uuid.uuid4().hex[:10]
    create(name)
    try:
        yield name, f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{quote(name, safe='')}"
    finally:
        delete(name)
