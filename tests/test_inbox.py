"""Inbox polling end to end: Dovecot on loopback -> ``poll_mailbox`` on a real worker -> events in
Postgres -> the test handler (``handlers_for_tests.on_email``) on the worker.

Each message is dispatched exactly once across repeated polls, a UIDVALIDITY change, a poll cut
halfway and a worker killed between polls. Each test has its own mailbox of tests/services.yaml
(its own folder and cursor).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from celery.signals import before_task_publish, task_failure, task_postrun
from conftest import IMAP_PASSWORD, REDIS_URL
from handlers_for_tests import runs_key
from imap_server import ImapServer, imap_server
from procs import BIN, env_with, running
from sqlalchemy import select
from tcp_proxy import TcpProxy

from integrations import inbox
from integrations.cli import main as cli
from integrations.config import Mailbox
from integrations.errors import PermanentError, TransientError
from integrations.ledger import events as events_ledger
from integrations.ledger.db import get_engine
from integrations.ledger.mailboxes import cursors, get_cursor
from integrations.ledger.models import Event
from tasks.events import publish_event
from tasks.inbox import poll_mailbox

pytestmark = pytest.mark.usefixtures("worker")

R = redis.Redis.from_url(REDIS_URL)
HANDLER = "handlers_for_tests.on_email"
T = TypeVar("T")


@dataclass
class Watch:
    """What this process's worker threads did: each poll's outcome, each message published."""

    polls: dict[str, tuple[str, Any]] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    dispatches: Counter[str] = field(default_factory=Counter)
    published: list[Any] = field(default_factory=list)

    def on_postrun(self, task_id: str, task: Any, retval: Any, state: str, **_: Any) -> None:
        if task.name == "integrations.poll_mailbox":
            self.polls[task_id] = (state, retval)

    def on_failure(self, task_id: str, exception: BaseException, **_: Any) -> None:
        self.errors[task_id] = exception

    def on_publish(self, sender: str, body: Any, headers: dict[str, Any], **_: Any) -> None:
        self.published.append({"task": sender, "headers": headers, "body": body})
        if sender == "integrations.dispatch_event":
            self.dispatches[body[0][0]] += 1


WATCH = Watch()


@pytest.fixture(scope="module", autouse=True)
def watch() -> Iterator[Watch]:
    receivers = [
        (task_postrun, WATCH.on_postrun),
        (task_failure, WATCH.on_failure),
        (before_task_publish, WATCH.on_publish),
    ]
    for signal_, receiver in receivers:
        signal_.connect(receiver, weak=False)
    yield WATCH
    for signal_, receiver in receivers:
        signal_.disconnect(receiver)


@pytest.fixture(scope="module")
def imap() -> Iterator[ImapServer]:
    """Dovecot on the port and with the password tests/services.yaml names (fails if missing)."""
    with imap_server(port=int(os.environ["IMAP_PORT"]), password=IMAP_PASSWORD) as server:
        yield server


@dataclass(frozen=True)
class Ran:
    state: str
    result: Any
    error: BaseException | None


def poll(mailbox: str, timeout: float = 30) -> Ran:
    """Run ``poll_mailbox(mailbox)`` on the worker, as beat would, and wait for its outcome."""
    task_id = poll_mailbox.delay(mailbox).id
    state, retval = wait_for(lambda: WATCH.polls.get(task_id), timeout, f"the poll of {mailbox}")
    return Ran(state, retval, WATCH.errors.get(task_id))


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


def message(subject: str, message_id: str | None = None, size: int = 0) -> bytes:
    m = EmailMessage()
    m["From"] = "Ada <ada@example.com>"
    m["To"] = "agent@example.com"
    m["Subject"] = subject
    m["Date"] = "Mon, 23 Nov 2026 09:00:00 +0000"
    m["Message-ID"] = message_id or make_msgid(domain="example.com")
    m.set_content("hello" + "x" * size)
    return m.as_bytes()


def emails(mailbox: str) -> list[dict[str, Any]]:
    """The mailbox's events: id, delivery id, when dispatched, and the payload's fields."""
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(Event.id, Event.delivery_id, Event.dispatched_at, Event.payload)
            .where(Event.source == "email", Event.event_type == "received")
            .where(Event.delivery_id.startswith(f"{mailbox}/"))
            .order_by(Event.received_at)
        ).all()
    return [
        {"id": r.id, "delivery_id": r.delivery_id, "dispatched_at": r.dispatched_at, **r.payload}
        for r in rows
    ]


def subjects(mailbox: str) -> list[str]:
    return sorted(e["subject"] for e in emails(mailbox))


def handled_once(events: list[dict[str, Any]], published_here: bool = True) -> None:
    """Each event was dispatched, its handling succeeded on the first try, the handler ran once
    and (when the worker is this process) its dispatch was published once."""
    assert events

    def settled() -> bool:
        return all(
            [h["status"] for h in events_ledger.handlings_of(e["id"]) if h["handler"] == HANDLER]
            == ["succeeded"]
            for e in events
        )

    wait_for(settled, 20, "the handlers")
    time.sleep(0.3)  # a second dispatch, were there one, would show by now
    for e in events:
        (handling,) = [h for h in events_ledger.handlings_of(e["id"]) if h["handler"] == HANDLER]
        assert handling["attempts"] == 1
        assert int(R.get(runs_key("on_email", e["id"])) or 0) == 1
        if published_here:
            assert WATCH.dispatches[e["id"]] == 1


def test_each_message_is_dispatched_once_across_repeated_polls(
    imap: ImapServer, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        imap.append("Repeat", message(f"first {i}"))
    assert poll("mail_repeat").result == {"skipped": False, "fetched": 3, "dispatched": 3, "duplicates": 0}
    assert poll("mail_repeat").result["fetched"] == 0
    for i in range(2):
        imap.append("Repeat", message(f"second {i}"))
    assert poll("mail_repeat").result == {"skipped": False, "fetched": 2, "dispatched": 2, "duplicates": 0}
    assert poll("mail_repeat").result["fetched"] == 0

    assert subjects("mail_repeat") == ["first 0", "first 1", "first 2", "second 0", "second 1"]
    handled_once(emails("mail_repeat"))
    assert get_cursor("mail_repeat") == (imap.uidvalidity("Repeat"), 5)

    # Operators see it: `integrations mailboxes`.
    assert cli(["mailboxes"]) == 0
    shown = capsys.readouterr().out
    assert re.search(
        rf"mail_repeat +127.0.0.1 +Repeat +30.0 +True +{imap.uidvalidity('Repeat')} +5 ", shown
    ), shown
    assert IMAP_PASSWORD not in shown


def test_with_read_existing_off_the_first_poll_leaves_the_old_mail_alone(imap: ImapServer) -> None:
    for i in range(2):
        imap.append("Fresh", message(f"old {i}"))
    assert poll("mail_fresh").result == {"skipped": False, "fetched": 0, "dispatched": 0, "duplicates": 0}
    assert get_cursor("mail_fresh") == (imap.uidvalidity("Fresh"), 2)
    imap.append("Fresh", message("new"))
    assert poll("mail_fresh").result == {"skipped": False, "fetched": 1, "dispatched": 1, "duplicates": 0}
    assert subjects("mail_fresh") == ["new"]
    handled_once(emails("mail_fresh"))


def test_the_event_carries_headers_text_and_attachment_metadata(imap: ImapServer) -> None:
    m = EmailMessage()
    m["From"] = "Ada Lovelace <ada@example.com>"
    m["To"] = "Agent <agent@example.com>, ops@example.com"
    m["Cc"] = "Bob <bob@example.com>"
    m["Subject"] = "Quarterly report ✓"
    m["Date"] = "Mon, 23 Nov 2026 09:30:00 +0100"
    m["Message-ID"] = message_id = make_msgid(domain="example.com")
    m.set_content("Numbers attached.\nRégards")
    m.add_alternative("<p>Numbers attached.</p>", subtype="html")
    m.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="q3.csv")
    m.add_attachment(b"\x89PNG" + b"\0" * 96, maintype="image", subtype="png", filename="chart.png")
    imap.append("Payload", m.as_bytes())
    imap.append("Payload", message("long", size=100_000))
    anonymous = message("no id")
    anonymous = anonymous.replace(b"Message-ID: ", b"X-Old-Id: ")
    uid = imap.append("Payload", anonymous)

    assert poll("mail_payload").result["dispatched"] == 3

    report, long, no_id = emails("mail_payload")
    assert {k: v for k, v in report.items() if k not in ("id", "dispatched_at")} == {
        "delivery_id": f"mail_payload/{message_id}",
        "mailbox": "mail_payload",
        "uid": 1,
        "message_id": message_id,
        "from": "ada@example.com",
        "to": ["agent@example.com", "ops@example.com"],
        "cc": ["bob@example.com"],
        "subject": "Quarterly report ✓",
        "date": "2026-11-23T09:30:00+01:00",
        "text": "Numbers attached.\nRégards\n",
        "truncated": False,
        "attachments": [
            {"filename": "q3.csv", "content_type": "text/csv", "size": 8},
            {"filename": "chart.png", "content_type": "image/png", "size": 100},
        ],
    }
    assert len(long["text"]) == inbox.TEXT_MAX_CHARS and long["truncated"] is True
    # No Message-ID: deduplicated on the UID under the folder's UIDVALIDITY instead.
    assert no_id["message_id"] is None
    assert no_id["delivery_id"] == f"mail_payload/uid/{imap.uidvalidity('Payload')}/{uid}"
    handled_once([report, long, no_id])


def test_a_uidvalidity_change_reads_the_folder_again_without_repeats(imap: ImapServer) -> None:
    old = [message("a", f"<a-{uuid.uuid4()}@example.com>"), message("b", f"<b-{uuid.uuid4()}@example.com>")]
    for m in old:
        imap.append("Renumbered", m)
    assert poll("mail_renumbered").result["dispatched"] == 2
    before = imap.uidvalidity("Renumbered")

    imap.recreate("Renumbered")  # renumbered: the same messages come back with new UIDs
    for m in old:
        imap.append("Renumbered", m)
    imap.append("Renumbered", message("c"))
    after = poll("mail_renumbered")

    assert after.result == {"skipped": False, "fetched": 3, "dispatched": 1, "duplicates": 2}
    now = imap.uidvalidity("Renumbered")
    assert now != before and get_cursor("mail_renumbered") == (now, 3)
    assert subjects("mail_renumbered") == ["a", "b", "c"]
    handled_once(emails("mail_renumbered"))


def test_a_poll_cut_halfway_fails_leaves_the_cursor_and_the_next_repeats_nothing(imap: ImapServer) -> None:
    with TcpProxy((imap.host, imap.port), port=int(os.environ["IMAP_PROXY_PORT"])) as proxy:
        for i in range(25):
            imap.append("Cut", message(f"m{i:02}", size=8000))  # about 8 KB each
        # A FETCH takes ten of them (80 KB): the connection drops inside the second one.
        proxy.drop_after(120_000)
        failed = poll("mail_cut")

        assert failed.state == "FAILURE"
        assert isinstance(failed.error, TransientError)
        assert str(failed.error) == "mailbox mail_cut at 127.0.0.1: connection dropped"
        assert len(emails("mail_cut")) == inbox.FETCH_CHUNK  # the first ten, stored and dispatched
        assert get_cursor("mail_cut") is None  # not advanced

        done = poll("mail_cut")
    assert done.result == {"skipped": False, "fetched": 25, "dispatched": 15, "duplicates": 10}
    assert subjects("mail_cut") == [f"m{i:02}" for i in range(25)]
    handled_once(emails("mail_cut"))
    assert get_cursor("mail_cut") == (imap.uidvalidity("Cut"), 25)


def test_a_poll_that_would_overlap_the_running_one_is_skipped(imap: ImapServer) -> None:
    imap.append("Locked", message("one"))
    with inbox.lock("mail_locked") as held:  # as a poll still running would
        assert held
        skipped = poll("mail_locked")
    assert skipped.result == {"skipped": True, "fetched": 0, "dispatched": 0, "duplicates": 0}
    assert emails("mail_locked") == [] and get_cursor("mail_locked") is None

    assert poll("mail_locked").result["dispatched"] == 1
    handled_once(emails("mail_locked"))


def test_without_redis_the_lock_is_a_file_lock(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "mailbox-x.lock"
    with inbox.file_lock(path) as first, inbox.file_lock(path) as second:
        assert (first, second) == (True, False)
    with inbox.file_lock(path) as again:
        assert again


def test_errors_are_typed_and_the_password_appears_nowhere(
    imap: ImapServer, app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    imap.append("Secret", message("secret"))
    assert poll("mail_secret").result["dispatched"] == 1
    refused = poll("mail_wrong_password")
    closed = poll("mail_closed")
    handled_once(emails("mail_secret"))

    assert isinstance(refused.error, PermanentError)
    assert str(refused.error) == "mailbox mail_wrong_password at 127.0.0.1: login refused"
    assert isinstance(closed.error, TransientError)
    assert str(closed.error) == "mailbox mail_closed at 127.0.0.1: connection refused"
    # The IMAP conversation was logged (imapclient redacts the LOGIN), so the check below
    # has something to look at.
    assert "LOGIN **REDACTED**" in caplog.text
    with get_engine().connect() as conn:
        ledger_rows = [
            dict(r) for t in (Event.__table__, cursors) for r in conn.execute(select(t)).mappings()
        ]
    seen = json.dumps(
        {
            "messages": WATCH.published,  # task args: names and ids only
            "ledger": ledger_rows,
            "errors": [repr(e) for e in WATCH.errors.values()] + [str(e.args) for e in WATCH.errors.values()],
            "beat": app.conf.beat_schedule,
        },
        default=str,
    )
    assert IMAP_PASSWORD not in seen
    assert IMAP_PASSWORD not in caplog.text


def test_tls_refuses_a_server_whose_certificate_is_not_trusted(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
    ]
    subprocess.run(
        [*openssl, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30
    )
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve_one() -> None:  # a self-signed IMAPS server: the handshake is as far as it gets
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                server_side.wrap_socket(conn, server_side=True).sendall(b"* OK IMAP4rev1 ready\r\n")

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        box = Mailbox(
            name="self_signed",
            host="127.0.0.1",
            port=listener.getsockname()[1],
            username="agent",
            password=IMAP_PASSWORD,
            timeout=5,
        )
        with pytest.raises(TransientError) as e:
            inbox.poll(box, publish_event)
        thread.join(timeout=10)
    assert str(e.value) == "mailbox self_signed at 127.0.0.1: TLS certificate not trusted"
    assert box.tls and IMAP_PASSWORD not in str(e.value)


def test_the_beat_schedule_has_a_poll_per_enabled_mailbox_at_its_interval(app: Any) -> None:
    schedule = app.conf.beat_schedule
    assert schedule["poll-mailbox-mail_repeat"] == {
        "task": "integrations.poll_mailbox",
        "schedule": 30.0,
        "args": ("mail_repeat",),
        "options": {"expires": 30.0},
    }
    assert "poll-mailbox-mail_off" not in schedule


def test_a_worker_killed_between_polls_repeats_nothing(imap: ImapServer, tmp_path: Path) -> None:
    # Worker processes of their own, on their own Redis database, killed outright in between.
    broker = REDIS_URL.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(broker).flushdb()
    env = env_with(BROKER_URL=broker, RESULT_BACKEND=broker, COORDINATION_URL=None)
    client = Celery(broker=broker)
    cmd = [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "threads", "-c", "4", "--loglevel=INFO"]
    cmd += ["--hostname=inbox@%h", "--without-mingle", "--without-gossip"]

    def poll_in(log: Path) -> str:
        """Queue the poll beat would, and return the worker's "succeeded" line for it."""
        task_id = client.send_task("integrations.poll_mailbox", ("mail_restart",), queue="integrations").id

        def done() -> str | None:
            return next((ln for ln in log.read_text().splitlines() if f"[{task_id}] succeeded" in ln), None)

        return wait_for(done, 30, "the poll in the worker process")

    for i in range(3):
        imap.append("Restart", message(f"before {i}"))
    logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    with running(cmd, env, logs[0]) as first:
        wait_for(lambda: "ready." in logs[0].read_text(), 60, "the worker to start")
        assert "'dispatched': 3" in poll_in(logs[0])
        handled_once(emails("mail_restart"), published_here=False)  # everything settled, then
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)

    for i in range(2):
        imap.append("Restart", message(f"after {i}"))
    with running(cmd, env, logs[1]):
        wait_for(lambda: "ready." in logs[1].read_text(), 60, "the new worker to start")
        assert "'fetched': 2, 'dispatched': 2, 'duplicates': 0" in poll_in(logs[1])
        assert "'fetched': 0" in poll_in(logs[1])
        handled_once(emails("mail_restart"), published_here=False)
    client.close()

    assert subjects("mail_restart") == ["after 0", "after 1", "before 0", "before 1", "before 2"]
    assert get_cursor("mail_restart") == (imap.uidvalidity("Restart"), 5)
    assert all(IMAP_PASSWORD not in log.read_text() for log in logs)


# ------------------------------------------------------------------------------------------------
# README claims (issue 10): what one poll reads at most
# ------------------------------------------------------------------------------------------------


def append_all(imap: ImapServer, folder: str, messages: list[bytes]) -> None:
    """Append ``messages`` to a new ``folder`` over one session."""
    with imap.client() as c:
        c.create_folder(folder)
        for m in messages:
            c.append(folder, m)


def test_a_poll_takes_at_most_100_messages_and_the_next_poll_the_rest(imap: ImapServer) -> None:
    append_all(imap, "Batch", [message(f"b{i:03}") for i in range(105)])
    first = poll("mail_batch", timeout=60)
    assert first.result == {"skipped": False, "fetched": 100, "dispatched": 100, "duplicates": 0}
    assert get_cursor("mail_batch") == (imap.uidvalidity("Batch"), 100)
    assert len(emails("mail_batch")) == 100

    second = poll("mail_batch")
    assert second.result == {"skipped": False, "fetched": 5, "dispatched": 5, "duplicates": 0}
    assert get_cursor("mail_batch") == (imap.uidvalidity("Batch"), 105)
    assert subjects("mail_batch") == [f"b{i:03}" for i in range(105)]


def sized_message(subject: str, size: int) -> bytes:
    """A plain-text message of exactly ``size`` bytes as IMAP counts them (CRLF lines)."""
    head = (
        f"From: Ada <ada@example.com>\r\nTo: agent@example.com\r\nSubject: {subject}\r\n"
        f"Date: Mon, 23 Nov 2026 09:00:00 +0000\r\nMessage-ID: {make_msgid(domain='example.com')}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"x" * 98 + b"\r\n"
    left = size - len(head)
    return head + line * (left // len(line)) + b"y" * (left % len(line))


def test_a_poll_reads_at_most_50_mib_and_the_next_poll_the_rest(imap: ImapServer) -> None:
    mib = 1024 * 1024
    append_all(imap, "Bytes", [sized_message(f"big {i}", 10 * mib) for i in range(6)])
    with imap.client() as c:
        c.select_folder("Bytes", readonly=True)
        sizes = [d[b"RFC822.SIZE"] for d in c.fetch(c.search("ALL"), ["RFC822.SIZE"]).values()]
    assert sizes == [10 * mib] * 6  # 60 MiB waiting

    first = poll("mail_bytes", timeout=120)
    assert first.result == {"skipped": False, "fetched": 5, "dispatched": 5, "duplicates": 0}  # 50 MiB
    assert get_cursor("mail_bytes") == (imap.uidvalidity("Bytes"), 5)
    second = poll("mail_bytes", timeout=120)
    assert second.result == {"skipped": False, "fetched": 1, "dispatched": 1, "duplicates": 0}
    assert subjects("mail_bytes") == [f"big {i}" for i in range(6)]
    assert all(e["truncated"] and len(e["text"]) == inbox.TEXT_MAX_CHARS for e in emails("mail_bytes"))
