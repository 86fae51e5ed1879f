"""The ``smtp`` kind against a real SMTP server: aiosmtpd on loopback (tests/smtp_server.py) with
STARTTLS under a CA made for the tests and AUTH required, through real workers.

Each test sends to recipients of its own (``<uuid>@example.com``), so it reads only its mail.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from celery.result import AsyncResult
from conftest import IMAP_PASSWORD, SMTP_CERTS, SMTP_PASSWORD
from imap_server import ImapServer, imap_server
from procs import cli
from pydantic import ValidationError
from smtp_server import USER, Arrived, Handler, smtp_server
from sqlalchemy import func, select

from integrations import health
from integrations.errors import InvalidParams, PermanentError
from integrations.ledger import reads
from integrations.ledger.db import get_engine
from integrations.ledger.models import Job, JobAttempt
from integrations.services import get_services
from integrations.services.smtp import SmtpService
from integrations.ssrf import BlockedAddress
from tasks import call_service
from tasks.inbox import poll_mailbox

pytestmark = pytest.mark.usefixtures("worker")
T = TypeVar("T")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # binary, with CR, LF and NUL bytes inside


@pytest.fixture(scope="module")
def server() -> Iterator[Handler]:
    """aiosmtpd on SMTP_PORT (STARTTLS) and SMTP_TLS_PORT (implicit TLS), one handler for both."""
    handler = Handler(SMTP_PASSWORD)
    with (
        smtp_server(int(os.environ["SMTP_PORT"]), SMTP_CERTS, handler),
        smtp_server(int(os.environ["SMTP_TLS_PORT"]), SMTP_CERTS, handler, implicit_tls=True),
    ):
        yield handler


@pytest.fixture
def rcpt() -> str:
    return f"r-{uuid.uuid4().hex[:12]}@example.com"


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


def send(service: str = "mail_out", **params: Any) -> AsyncResult:
    return call_service.delay(
        service, "send", {"from": "Agent <agent@example.com>", "subject": "hi", **params}
    )


def job(job_id: str) -> dict[str, Any]:
    found = reads.get_job(job_id, with_attempts=True)
    assert found is not None
    return found


def test_a_message_arrives_with_its_headers_body_and_attachments_intact(server: Handler, rcpt: str) -> None:
    csv = b"a,b\r\n1,2\r\n"
    out = send(
        to=[f"Ada Lovelace <{rcpt}>"],
        cc=["Bob <cc-" + rcpt + ">"],
        bcc=["bcc-" + rcpt],
        reply_to=["replies@example.com"],
        subject="Quarterly report ✓",
        text="Numbers attached.\nRégards\n",
        html="<p>Numbers attached.</p>",
        headers={"X-Agent": "reporter", "In-Reply-To": "<q3@example.com>"},
        attachments=[
            {"filename": "q3.csv", "content_type": "text/csv", "content": base64.b64encode(csv).decode()},
            {"filename": "chart.png", "content_type": "image/png", "content": base64.b64encode(PNG).decode()},
        ],
    ).get(timeout=30)

    (arrived,) = server.to(rcpt)
    msg = arrived.message
    assert (arrived.tls, arrived.login) == (True, USER)  # STARTTLS, then AUTH
    assert arrived.mail_from == "agent@example.com"
    assert sorted(arrived.rcpt_tos) == sorted([rcpt, f"cc-{rcpt}", f"bcc-{rcpt}"])
    assert msg["From"] == "Agent <agent@example.com>"
    assert msg["To"] == f"Ada Lovelace <{rcpt}>" and msg["Cc"] == f"Bob <cc-{rcpt}>"
    assert msg["Bcc"] is None and f"bcc-{rcpt}".encode() not in arrived.data  # in the envelope only
    assert msg["Reply-To"] == "replies@example.com"
    assert msg["Subject"] == "Quarterly report ✓"
    assert msg["X-Agent"] == "reporter" and msg["In-Reply-To"] == "<q3@example.com>"
    assert msg["Message-ID"] == f"<{out['job_id']}@example.com>"
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and html is not None
    # On the wire lines end in CRLF; the text is the same.
    assert plain.get_content().replace("\r\n", "\n") == "Numbers attached.\nRégards\n"
    assert html.get_content().replace("\r\n", "\n") == "<p>Numbers attached.</p>\n"
    files = {
        p.get_filename(): (p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_attachments()
    }
    assert files == {"q3.csv": ("text/csv", csv), "chart.png": ("image/png", PNG)}

    assert out["status_code"] == 250
    assert out["meta"] == {"message_id": f"<{out['job_id']}@example.com>", "reply_code": 250}
    row = job(out["job_id"])
    assert row["status"] == "succeeded" and row["status_code"] == 250 and row["meta"] == out["meta"]
    assert row["response_excerpt"] == "250 2.0.0 OK: queued"
    # The ledger keeps what the job was asked, not what it carried: bodies and attachments'
    # bytes become digests once the job is settled; a replay of it is refused.
    kept = json.dumps(row["params"])
    assert "Numbers attached" not in kept and base64.b64encode(csv).decode() not in kept
    assert row["params"]["subject"] == "Quarterly report ✓" and "$dropped" in row["params"]["text"]
    assert [a["filename"] for a in row["params"]["attachments"]] == ["q3.csv", "chart.png"]


def test_implicit_tls_sends_and_the_cli_waits_for_the_result(server: Handler, rcpt: str) -> None:
    result = cli(
        "call", "mail_out_tls", "send", "from=agent@example.com", f'to=["{rcpt}"]', "subject=via the CLI",
        "text=hello", "--wait", "--timeout", "30",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    (arrived,) = server.to(rcpt)
    assert arrived.tls and arrived.message["Subject"] == "via the CLI"
    assert arrived.message["Message-ID"] == out["data"]["message_id"] == f"<{out['job_id']}@example.com>"


def test_a_connection_dropped_after_data_is_retried_with_the_same_message_id(
    server: Handler, rcpt: str
) -> None:
    server.data_steps[rcpt] = ["drop"]
    out = send(to=[rcpt], text="once, I hope").get(timeout=30)

    first, second = server.to(rcpt)  # the server had the whole message when the answer was lost
    assert first.reply == "drop"
    assert first.message["Message-ID"] == second.message["Message-ID"] == f"<{out['job_id']}@example.com>"
    row = job(out["job_id"])
    assert row["status"] == "succeeded" and row["attempts"] == 2
    assert [a["outcome"] for a in row["attempts_log"]] == ["retrying", "succeeded"]
    assert row["attempts_log"][0]["error"] == "localhost: connection dropped"


def test_a_4xx_is_retried_and_a_5xx_fails_at_once(server: Handler, rcpt: str) -> None:
    server.data_steps[rcpt] = ["451 4.3.0 Local error in processing, try later"]
    later = send(to=[rcpt]).get(timeout=30)
    assert [a.reply for a in server.to(rcpt)] == [
        "451 4.3.0 Local error in processing, try later",
        "250 2.0.0 OK: queued",
    ]
    row = job(later["job_id"])
    assert row["attempts"] == 2 and row["attempts_log"][0]["status_code"] == 451

    final = f"final-{rcpt}"
    server.data_steps[final] = ["554 5.6.0 Message rejected: content policy"]
    result = send(to=[final])
    with pytest.raises(PermanentError) as e:
        result.get(timeout=30)
    assert str(e.value) == "localhost refused DATA: 554 5.6.0 Message rejected: content policy"
    row = job(result.id)
    assert (row["status"], row["attempts"], row["status_code"]) == ("failed", 1, 554)
    assert row["meta"] == {"message_id": f"<{result.id}@example.com>"}
    assert len(server.to(final)) == 1


def test_a_partial_refusal_delivers_to_the_rest_and_lists_the_refused(server: Handler, rcpt: str) -> None:
    gone = f"gone-{rcpt}"
    server.rcpt_replies[gone] = "550 5.1.1 No such user here"
    out = send(to=[rcpt, gone]).get(timeout=30)

    (arrived,) = server.to(rcpt)
    assert arrived.rcpt_tos == [rcpt]
    refused = [{"address": gone, "code": 550, "reply": "5.1.1 No such user here"}]
    assert out["data"]["accepted"] == [rcpt] and out["data"]["refused"] == refused
    assert job(out["job_id"])["meta"]["refused"] == refused

    # Every recipient refused: the job fails, and a 452 (too many recipients for now) is retried.
    busy = f"busy-{rcpt}"
    server.rcpt_replies[busy] = "452 4.5.3 Too many recipients"
    result = send(to=[busy, gone])
    with pytest.raises(Exception, match=r"refused RCPT TO \(every recipient\): 452"):
        result.get(timeout=30)
    assert job(result.id)["attempts"] == 4  # the first and max_retries: 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"subject": "hi\r\nBcc: victim@example.com"}, "subject: must not contain a line break"),
        ({"to": ["a@example.com\nBcc: victim@example.com"]}, "to.0: must not contain a line break"),
        ({"headers": {"X-Note": "a\rb"}}, "headers.X-Note: must not contain a line break"),
        ({"headers": {"X-Evil\r\nBcc": "x"}}, "headers: must not contain a line break"),
        ({"from": "agent@example.com\x00"}, "from: must not contain a line break"),
        ({"subject": "hi\u2028Bcc: victim@example.com"}, "subject: must not contain a line break"),
        ({"headers": {"X-Note": "a\x85b"}}, "headers.X-Note: must not contain a line break"),
        (
            {"attachments": [{"filename": "a\n.txt", "content": ""}]},
            "attachments.0.filename: must not contain a line break",
        ),
        ({"headers": {"Message-ID": "<x@y>"}}, "headers.Message-ID: set by the operation's own parameters"),
        ({"headers": {"Resent-From": "ceo@bank.example"}}, "headers.Resent-From: set by the operation's own"),
        ({"to": ["not an address"]}, "to.0: not an email address"),
        ({"attachments": [{"filename": "a", "content": "***"}]}, "attachments.0.content: not valid base64"),
        (
            {"attachments": [{"filename": "a", "content": base64.b64encode(b"x" * 100_001).decode()}]},
            "attachments: larger than 100000 bytes in all",
        ),
    ],
)
def test_bad_params_are_refused_at_submit_and_nothing_is_written(
    server: Handler, rcpt: str, params: dict[str, Any], message: str
) -> None:
    with get_engine().connect() as conn:
        before = conn.execute(select(func.count()).select_from(Job)).scalar()
    with pytest.raises(InvalidParams) as e:
        send(**{"to": [rcpt], **params})
    assert message in str(e.value)
    with get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar() == before
    assert server.to(rcpt) == [] and "victim" not in str(e.value)


def test_refusals_before_any_mail_are_permanent_and_the_password_appears_nowhere(
    server: Handler, rcpt: str, app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = send(to=[rcpt]).get(timeout=30)
    failures = {}
    for service in ("mail_out_wrong_password", "mail_out_untrusted", "mail_out_guarded"):
        result = send(service, to=[rcpt])
        with pytest.raises(PermanentError) as e:
            result.get(timeout=30)
        failures[service] = (e.value, job(result.id))

    err, row = failures["mail_out_wrong_password"]
    assert str(err) == "localhost refused AUTH: 535 5.7.8 Authentication credentials invalid"
    assert row["attempts"] == 1 and row["status_code"] == 535
    assert str(failures["mail_out_untrusted"][0]) == "localhost: TLS certificate not trusted (see ca_bundle)"
    assert isinstance(failures["mail_out_guarded"][0], BlockedAddress)
    assert len(server.to(rcpt)) == 1  # only the good one
    assert ("agent", False) in server.logins  # the wrong password did reach the server

    with get_engine().connect() as conn:
        rows = [
            dict(r) for t in (Job.__table__, JobAttempt.__table__) for r in conn.execute(select(t)).mappings()
        ]
    backend = [
        app.backend.get(app.backend.get_key_for_task(i))
        for i in [ok["job_id"], *(r["id"] for _, r in failures.values())]
    ]
    seen = json.dumps(
        {"ledger": rows, "backend": backend, "errors": [repr(e) for e, _ in failures.values()]}, default=str
    )
    secrets = [SMTP_PASSWORD, base64.b64encode(f"\0{USER}\0{SMTP_PASSWORD}".encode()).decode()]
    for secret in secrets:
        assert secret not in seen and secret not in caplog.text
    assert "wrong-" + SMTP_PASSWORD not in seen


def test_the_health_check_says_ehlo_and_noop_and_services_lists_send(server: Handler) -> None:
    svc = get_services()["mail_out"]
    checked = health.check(svc)
    assert checked.ok and checked.status_code == 250
    with pytest.raises(PermanentError, match="TLS certificate not trusted"):
        get_services()["mail_out_untrusted"].check_health()

    listed = cli("services")
    assert "mail_out (smtp, localhost:" in listed.stdout and ", starttls, auth as agent)" in listed.stdout
    assert "  send: Send an email" in listed.stdout and SMTP_PASSWORD not in listed.stdout


def test_the_config_refuses_plain_smtp_off_loopback_and_half_credentials() -> None:
    with pytest.raises(ValidationError, match="plain SMTP is allowed only to a loopback host"):
        SmtpService(name="x", host="smtp.example.com", security="plain")
    with pytest.raises(ValidationError, match="username and password go together"):
        SmtpService(name="x", host="smtp.example.com", username="me")
    with pytest.raises(ValidationError, match="a host name or an IP address"):
        SmtpService(name="x", host="smtp://smtp.example.com")
    assert (
        SmtpService(name="x", host="127.0.0.1", security="plain").describe()
        == "smtp, 127.0.0.1:25, plain, no auth"
    )
    only = SmtpService(name="x", host="smtp.example.com", senders=("agent@example.com", "@acme.example"))
    send_op = only.catalog()["send"]
    base = {"to": ["bob@example.org"], "subject": "hi", "text": "."}
    for allowed in ("agent@example.com", "Agent <AGENT@example.com>", "Sales <sales@acme.example>"):
        assert send_op.validate_params({**base, "from": allowed})["from"] == allowed
    for refused in ("ceo@example.com", "agent@sub.acme.example", "agent@example.com.evil.example"):
        with pytest.raises(InvalidParams, match=r"^from: not one of the service's senders$"):
            send_op.validate_params({**base, "from": refused})
    schema = SmtpService(name="x", host="smtp.example.com").catalog()["send"].parameters
    assert schema["required"] == ["from", "to", "subject"] and schema["additionalProperties"] is False


@pytest.fixture(scope="module")
def imap() -> Iterator[ImapServer]:
    with imap_server(port=int(os.environ["IMAP_PORT"]), password=IMAP_PASSWORD) as box:
        yield box


def test_the_email_agent_replies_to_a_message_in_its_mailbox(server: Handler, imap: ImapServer) -> None:
    """Dovecot -> beat's poll -> email:received -> handlers_email_agent -> mail_out -> aiosmtpd."""
    sender = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    original = f"<{uuid.uuid4().hex}@example.com>"
    imap.append(
        "Agent",
        (
            f"From: Ada <{sender}>\r\nTo: agent@example.com\r\nSubject: Lunch?\r\n"
            f"Date: Mon, 23 Nov 2026 09:00:00 +0000\r\nMessage-ID: {original}\r\n"
            "\r\nAre you free at noon?\r\n"
        ).encode(),
    )

    poll_mailbox.delay("mail_agent")  # as beat does on the mailbox's interval

    reply: Arrived = wait_for(lambda: next(iter(server.to(sender)), None), 30, "the agent's reply")
    msg = reply.message
    assert msg["In-Reply-To"] == original and msg["References"] == original
    assert msg["Subject"] == "Re: Lunch?" and msg["From"] == "Agent <agent@example.com>"
    assert reply.rcpt_tos == [sender] and reply.tls
