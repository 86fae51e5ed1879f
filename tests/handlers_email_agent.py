"""The seeds' email agent, as a handler an agent could have written (EVENT_HANDLERS): a message
arriving in the ``mail_agent`` mailbox is answered through the ``mail_out`` SMTP service, as a
reply (``In-Reply-To`` and ``References`` name the message answered)."""

from __future__ import annotations

from integrations.events import Event, handler

MAILBOX = "mail_agent"
SENDER = "Agent <agent@example.com>"


@handler("email:received")
def reply_by_email(event: Event) -> None:
    mail = event.payload
    if mail.get("mailbox") != MAILBOX or not mail.get("from"):
        return
    from tasks import call_service

    subject = mail.get("subject") or ""
    params = {
        "from": SENDER,
        "to": [mail["from"]],
        "subject": subject if subject.lower().startswith("re:") else f"Re: {subject}",
        "text": f"Thanks, I got your message of {mail.get('date')}.\n",
        "headers": {"In-Reply-To": mail["message_id"], "References": mail["message_id"]}
        if mail.get("message_id")
        else {},
    }
    # One reply per event, however often the handler is retried.
    call_service.delay("mail_out", "send", params, idempotency_key=f"reply:{event.id}", agent="email-agent")
