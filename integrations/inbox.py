"""Poll an IMAP mailbox for new mail and hand each message to the handlers as ``email:received``.

One poll (:func:`poll`), run by beat for each mailbox on its interval:

1. Take the mailbox's lock, or skip the poll: two polls of one mailbox never overlap.
2. Select the folder read-only and read its UIDVALIDITY. The cursor (UIDVALIDITY, last UID)
   in the ledger says where the last successful poll stopped; a changed UIDVALIDITY means the
   UIDs were renumbered, and the folder is read again from the start.
3. Fetch the messages after the cursor (at most ``BATCH``; the rest next time), a few at a
   time; store each as an event, deduplicated on its Message-ID, and queue its dispatch.
4. Only when all went well, move the cursor. A poll that fails halfway leaves it: the next
   poll fetches the same messages again, and those already stored are recognised and not
   dispatched twice.

The event's payload::

    {"mailbox", "uid", "message_id", "from", "to": [...], "cc": [...], "subject",
     "date" (ISO 8601), "text" (the text/plain body), "attachments": [{"filename",
     "content_type", "size" (decoded bytes)}], "truncated" (text cut at TEXT_MAX_CHARS, or only
     the headers of a message over MESSAGE_MAX_BYTES read)}

The event is deduplicated on ``{mailbox}/{Message-ID}`` (``{mailbox}/uid/{uidvalidity}/{uid}``
for a message without one), so a message stored once is never dispatched again, whatever
happens to the cursor.

Free of Celery: ``tasks.inbox.poll_mailbox`` runs it with the broker's ``publish_event``.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import email.utils
import fcntl
import hashlib
import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from redis.exceptions import LockError

from integrations import coordination
from integrations.config import Mailbox, get_settings
from integrations.errors import PermanentError, TransientError
from integrations.ledger import events as events_ledger
from integrations.ledger import mailboxes as ledger

log = logging.getLogger(__name__)

#: Messages fetched by one poll at most; the rest wait for the next.
BATCH = 100
#: One FETCH asks for at most this many messages and, unless one message is larger, bytes.
FETCH_CHUNK = 10
FETCH_BYTES = 1024 * 1024
#: Bytes of mail one poll reads at most (a larger message goes alone).
POLL_BYTES = 50 * 1024 * 1024
#: Of a larger message only the headers are fetched (its event says ``truncated``).
MESSAGE_MAX_BYTES = 32 * 1024 * 1024
#: Text kept of a message's body in its event.
TEXT_MAX_CHARS = 64 * 1024
ATTACHMENTS_MAX = 100

SOURCE, EVENT_TYPE = "email", "received"

Publish = Callable[[str], None]


@dataclass(frozen=True)
class Poll:
    """What one poll did. ``skipped``: another poll of the mailbox was running."""

    mailbox: str
    skipped: bool = False
    fetched: int = 0
    dispatched: int = 0
    duplicates: int = 0
    uidvalidity: int | None = None
    last_uid: int | None = None


def poll(box: Mailbox, publish: Publish) -> Poll:
    """Poll ``box`` once; ``publish(event_id)`` queues a stored event for its handlers.

    Raises :class:`TransientError` when the server cannot be reached or drops the connection,
    :class:`PermanentError` when it refuses the login or the folder. Messages name the
    mailbox and the host, never the password. Either way the cursor stays where it was.
    """
    with lock(box.name) as held:
        if not held:
            log.info("poll of mailbox %s skipped: the previous one is still running", box.name)
            return Poll(box.name, skipped=True)
        try:
            with _connect(box) as client:
                return _poll(box, client, publish)
        except (IMAPClientError, OSError) as e:
            kind = PermanentError if _refused(e) else TransientError
            # Not chained: the server's own words could echo what we sent.
            raise kind(f"mailbox {box.name} at {box.host}: {_reason(e)}") from None


def _poll(box: Mailbox, client: IMAPClient, publish: Publish) -> Poll:
    status = client.select_folder(box.folder, readonly=True)  # EXAMINE: no flag is changed
    uidvalidity = int(status[b"UIDVALIDITY"])
    cursor = ledger.get_cursor(box.name)
    last = 0
    if cursor is not None:
        if cursor.uidvalidity == uidvalidity:
            last = cursor.last_uid
        else:
            log.warning(
                "mailbox %s: UIDVALIDITY changed from %d to %d; the cursor starts over",
                box.name,
                cursor.uidvalidity,
                uidvalidity,
            )
    if last == 0 and not box.read_existing:
        # Start at the folder's end: what is there now is not news. After a UIDVALIDITY change
        # too (the old mail was never stored): mail that came in since the last poll and before
        # the renumbering is then not dispatched, which the warning above announces.
        end = int(status.get(b"UIDNEXT", 0)) - 1
        if end < 0:
            end = max(client.search(["ALL"]), default=0)
        ledger.set_cursor(box.name, uidvalidity, end)
        log.info("mailbox %s: starting after UID %d; earlier messages left alone", box.name, end)
        return Poll(box.name, uidvalidity=uidvalidity, last_uid=end)
    # "n:*" always matches the last message, even when its UID is below n (RFC 9051, 6.4.8).
    uids = sorted(u for u in client.search(["UID", f"{last + 1}:*"]) if u > last)[:BATCH]
    sizes = {u: int(d.get(b"RFC822.SIZE", 0)) for u, d in client.fetch(uids, ["RFC822.SIZE"]).items()}
    # A poll reads at most POLL_BYTES (one larger message alone), so it ends well within the
    # task's time limit and the cursor moves; the rest waits for the next poll.
    total = 0
    for n, uid in enumerate(uids):
        total += min(sizes.get(uid, 0), MESSAGE_MAX_BYTES)
        if n and total > POLL_BYTES:
            uids = uids[:n]
            break
    dispatched = duplicates = 0
    for chunk in _chunks(uids, sizes):
        whole = len(chunk) > 1 or sizes.get(chunk[0], 0) <= MESSAGE_MAX_BYTES
        item, key = (b"BODY.PEEK[]", b"BODY[]") if whole else (b"BODY.PEEK[HEADER]", b"BODY[HEADER]")
        fetched = client.fetch(chunk, [item])
        for uid in chunk:
            raw = fetched.get(uid, {}).get(key)
            if raw is None:
                continue  # expunged since the search
            if _store_and_publish(box.name, uidvalidity, uid, describe(raw, box.name, uid, whole), publish):
                dispatched += 1
            else:
                duplicates += 1
    new_last = max(uids, default=last)
    if cursor != (uidvalidity, new_last):
        ledger.set_cursor(box.name, uidvalidity, new_last)
    return Poll(box.name, False, len(uids), dispatched, duplicates, uidvalidity, new_last)


def _chunks(uids: list[int], sizes: dict[int, int]) -> Iterator[list[int]]:
    """``uids`` in runs of at most ``FETCH_CHUNK`` messages and ``FETCH_BYTES`` (a larger
    message goes alone), so a poll never holds much more than one FETCH's answer."""
    chunk: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if chunk and (len(chunk) == FETCH_CHUNK or total + size > FETCH_BYTES):
            yield chunk
            chunk, total = [], 0
        chunk.append(uid)
        total += size
    if chunk:
        yield chunk


def _store_and_publish(
    mailbox: str, uidvalidity: int, uid: int, payload: dict[str, Any], publish: Publish
) -> bool:
    """Store the message's event and queue it; ``False`` when it was stored before."""
    key = payload["message_id"] or f"uid/{uidvalidity}/{uid}"
    delivery_id = f"{mailbox}/{key}"
    if len(delivery_id) > 255:  # the column's size: a long Message-ID is kept whole as a digest
        delivery_id = f"{mailbox}/sha256/{hashlib.sha256(key.encode()).hexdigest()}"
    event_id = events_ledger.store_event(SOURCE, delivery_id, EVENT_TYPE, payload)
    if event_id is None:
        return False
    try:
        publish(event_id)
    except Exception:
        events_ledger.forget_event(event_id)  # stored again by the next poll
        raise
    return True


def describe(raw: bytes, mailbox: str, uid: int, whole: bool = True) -> dict[str, Any]:
    """The event payload of a message (``whole=False``: only its headers were fetched)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    try:
        return _describe(message, mailbox, uid, whole)
    except Exception as e:
        # The email package raises on some malformed messages. One of them must not stop the
        # mailbox for good (the cursor would never pass it): its event says what went wrong.
        log.warning("mailbox %s: message %d could not be parsed (%s)", mailbox, uid, type(e).__name__)
        compat = email.message_from_bytes(raw, policy=email.policy.compat32)
        message_id = str(compat["message-id"] or "").strip() or None
        return {"mailbox": mailbox, "uid": uid, "message_id": message_id, "error": type(e).__name__}


def _describe(message: EmailMessage, mailbox: str, uid: int, whole: bool) -> dict[str, Any]:
    def addresses(name: str) -> list[str]:
        values = [str(v) for v in message.get_all(name, [])]
        return [addr for _, addr in email.utils.getaddresses(values) if addr]

    date = None
    with contextlib.suppress(TypeError, ValueError):
        parsed = email.utils.parsedate_to_datetime(str(message["date"])) if message["date"] else None
        date = parsed.isoformat() if parsed else None
    text = ""
    body = message.get_body(preferencelist=("plain",)) if whole else None
    if body is not None:
        try:
            text = str(body.get_content())
        except (LookupError, UnicodeError):  # an unknown or lying charset
            raw = body.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
        text = text.replace("\r\n", "\n")
    attachments = []
    for part in message.walk() if whole else ():
        if part.is_multipart() or part is body:
            continue
        filename = part.get_filename()
        if filename is None and part.get_content_disposition() != "attachment":
            continue  # an alternative of the body (text/html), not an attachment
        content = part.get_payload(decode=True)
        attachments.append(
            {
                "filename": filename,
                "content_type": part.get_content_type(),
                "size": len(content) if isinstance(content, bytes) else 0,
            }
        )
    sender = addresses("from")
    return {
        "mailbox": mailbox,
        "uid": uid,
        "message_id": str(message["message-id"] or "").strip() or None,
        "from": sender[0] if sender else None,
        "to": addresses("to"),
        "cc": addresses("cc"),
        "subject": str(message["subject"] or ""),
        "date": date,
        "text": text[:TEXT_MAX_CHARS],
        "truncated": len(text) > TEXT_MAX_CHARS or not whole or len(attachments) > ATTACHMENTS_MAX,
        "attachments": attachments[:ATTACHMENTS_MAX],
    }


@contextlib.contextmanager
def _connect(box: Mailbox) -> Iterator[IMAPClient]:
    # TLS verifies the server's certificate and name against the system's CAs.
    context = ssl.create_default_context() if box.tls else None
    client = IMAPClient(box.host, port=box.port, ssl=box.tls, ssl_context=context, timeout=box.timeout)
    try:
        client.login(box.username, box.password.get_secret_value())
        yield client
    finally:
        # A dropped connection cannot log out (imaplib closes the socket all the same); the
        # poll's own error is the one to report.
        with contextlib.suppress(IMAPClientError, OSError):
            client.logout()


@contextlib.contextmanager
def lock(mailbox: str) -> Iterator[bool]:
    """Hold the mailbox's poll lock if it is free; yields whether it is held.

    In the shared Redis when there is one (every worker node), else a file lock under VAR_DIR
    (every process on this machine).
    """
    settings = get_settings()
    redis = coordination.client()
    if redis is None:
        with file_lock(settings.var_dir / "locks" / f"mailbox-{mailbox}.lock") as held:
            yield held
        return
    # Expires after the task's hard time limit: by then no poll can still hold it, and a
    # worker killed mid-poll blocks the mailbox no longer than that.
    redis_lock = redis.lock(f"integrations:mailbox-lock:{mailbox}", timeout=settings.task_time_limit + 10)
    if not redis_lock.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        try:
            redis_lock.release()
        except LockError:
            log.warning("mailbox %s: the poll outlived its lock", mailbox)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` if it is free; yields whether it is held. Released
    with the file, so a process that dies holding it does not keep it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        else:
            held = True
        try:
            yield held
        finally:
            if held:
                fcntl.flock(f, fcntl.LOCK_UN)


def _refused(e: BaseException) -> bool:
    """The server said no (login, folder): trying again will not help."""
    text = str(e).lower()
    return isinstance(e, LoginError) or "nonexistent" in text or "doesn't exist" in text


def _reason(e: BaseException) -> str:
    """A short reason, never the server's own words (they could echo what we sent)."""
    if isinstance(e, LoginError):
        return "login refused"
    if _refused(e):
        return "no such folder"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted"
    if isinstance(e, ssl.SSLError):
        return "TLS error"
    if isinstance(e, OSError | IMAPClientAbortError):
        return "connection dropped"
    return type(e).__name__
