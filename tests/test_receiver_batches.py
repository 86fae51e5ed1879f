"""The receiver under concurrent deliveries (issue 15): what arrives while a write is in flight is
stored by the next write in one commit and queued in one message, every delivery still stored
before its answer and queued once; several receiver processes (RECEIVER_WORKERS) share a port.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import procs
import pytest
import redis
import requests
from asgi_server import serve
from celery.signals import before_task_publish
from conftest import GH_SECRET, REDIS_URL, free_port
from handlers_for_tests import runs_key
from procs import BIN, env_with, running
from sqlalchemy import func, select

from integrations.config import get_settings, get_webhooks
from integrations.ledger.db import get_engine
from integrations.ledger.models import Event
from integrations.webhooks.receiver import create_app
from tasks.events import publish_event, publish_events

pytestmark = pytest.mark.usefixtures("worker")

R = redis.Redis.from_url(REDIS_URL)


@pytest.fixture
def published() -> Iterator[list[tuple[str, Any]]]:
    """``(task name, args)`` of every message this process publishes while the test runs."""
    seen: list[tuple[str, Any]] = []

    def record(sender: str | None = None, body: Any = None, **_: Any) -> None:
        seen.append((str(sender), body[0] if body else None))

    before_task_publish.connect(record, weak=False)
    yield seen
    before_task_publish.disconnect(record)


def post_at_once(
    url: str, deliveries: list[tuple[str, dict[str, Any]]], source: str = "gh_load"
) -> list[Any]:
    """POST each ``(delivery id, payload)`` from its own thread, all released at the same moment."""
    start = threading.Barrier(len(deliveries))

    def post(item: tuple[str, dict[str, Any]]) -> requests.Response:
        delivery, payload = item
        body = json.dumps(payload).encode()
        sig = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery}
        start.wait(timeout=30)
        return requests.post(f"{url}/webhooks/{source}", data=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(max_workers=len(deliveries)) as pool:
        return list(pool.map(post, deliveries))


def stored(delivery_ids: list[str]) -> dict[str, Any]:
    """``{delivery id: dispatched_at}`` of the stored events among ``delivery_ids``."""
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(Event.delivery_id, Event.dispatched_at).where(Event.delivery_id.in_(delivery_ids))
        )
        return {r.delivery_id: r.dispatched_at for r in rows}


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def receiver(publish_many: Callable[[list[str]], None] | None = publish_events) -> Any:
    """The receiver as ``integrations receiver`` makes it (tasks.receiver.app_from_settings)."""
    return create_app(
        get_webhooks(), publish_event, get_settings().webhook_max_body_bytes, publish_many=publish_many
    )


def test_deliveries_arriving_together_share_writes_and_messages_and_each_is_handled_once(
    published: list[tuple[str, Any]],
) -> None:
    run = uuid.uuid4().hex[:8]
    deliveries = [(f"{run}-{n}", {"n": f"{run}-{n}"}) for n in range(40)]
    with serve(receiver()) as url:
        answers = post_at_once(url, deliveries)

    assert [a.status_code for a in answers] == [202] * 40
    event_ids = [a.json()["event_id"] for a in answers]
    assert len(set(event_ids)) == 40
    assert set(stored([d for d, _ in deliveries])) == {d for d, _ in deliveries}  # stored before answering
    # Every event in exactly one message; fewer messages than events: writes were shared.
    queued = [
        event_id
        for name, args in published
        if name in ("integrations.dispatch_event", "integrations.dispatch_events")
        for event_id in (args[0] if name.endswith("events") else [args[0]])
    ]
    assert sorted(queued) == sorted(event_ids)
    messages = [name for name, _ in published if name.startswith("integrations.dispatch_event")]
    assert "integrations.dispatch_events" in messages and len(messages) < 40, messages
    # The worker hands each to the handler once.
    wait_for(lambda: all(int(R.get(runs_key("on_load", e)) or 0) == 1 for e in event_ids))
    time.sleep(1)
    assert all(int(R.get(runs_key("on_load", e)) or 0) == 1 for e in event_ids)


def test_one_delivery_sent_by_many_at_once_is_stored_and_queued_once(
    published: list[tuple[str, Any]],
) -> None:
    delivery = uuid.uuid4().hex
    with serve(receiver()) as url:
        answers = post_at_once(url, [(delivery, {"n": delivery})] * 12)

    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 11 + [202]
    assert [a.json() for a in answers if a.status_code == 200] == [{"status": "duplicate"}] * 11
    (accepted,) = [a.json()["event_id"] for a in answers if a.status_code == 202]
    with get_engine().connect() as conn:
        n = conn.execute(
            select(func.count()).select_from(Event).where(Event.delivery_id == delivery)
        ).scalar_one()
    assert n == 1
    queued = [args for name, args in published if name.startswith("integrations.dispatch_event")]
    assert [accepted] in [list(a[0]) if isinstance(a[0], list) else [a[0]] for a in queued]
    wait_for(lambda: int(R.get(runs_key("on_load", accepted)) or 0) == 1)


def test_a_batch_whose_message_fails_is_accepted_stored_and_left_to_the_sweeper() -> None:
    calls: list[list[str]] = []

    def broker_down(event_ids: list[str]) -> None:
        calls.append(list(event_ids))
        raise ConnectionError("broker unavailable")

    run = uuid.uuid4().hex[:8]
    deliveries = [(f"{run}-{n}", {"n": f"{run}-{n}"}) for n in range(20)]
    with serve(receiver(broker_down)) as url:
        answers = post_at_once(url, deliveries)
    assert [a.status_code for a in answers] == [202] * 20
    rows = stored([d for d, _ in deliveries])
    assert len(rows) == 20 and all(dispatched is None for dispatched in rows.values())  # the sweeper's cue
    # Each write tried its message once; every event was in one of them.
    assert sorted(e for batch in calls for e in batch) == sorted(a.json()["event_id"] for a in answers)


def test_receiver_workers_serve_one_port_from_several_processes(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "receiver.log"
    env = env_with(RECEIVER_PORT=port, RECEIVER_WORKERS=2)
    with running([str(BIN / "integrations"), "receiver"], env, log) as proc:
        procs.wait_for(lambda: requests.get(f"{url}/healthz", timeout=2).ok, 60, "the receiver", log)
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        # uvicorn's workers are spawned interpreters (beside them, multiprocessing's resource tracker).
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, (children, log.read_text())

        run = uuid.uuid4().hex[:8]
        deliveries = [(f"{run}-{n}", {"n": f"{run}-{n}"}) for n in range(30)]
        answers = post_at_once(url, deliveries)
    assert [a.status_code for a in answers] == [202] * 30, log.read_text()[-2000:]
    assert len(stored([d for d, _ in deliveries])) == 30
