"""The ``send`` operation of the ``smtp`` kind: its JSON Schema, the checks the schema cannot
say, and the message it becomes (:class:`email.message.EmailMessage`).

Everything a header is made of (addresses, subject, extra headers, attachment names and types)
is refused at submit when it holds a CR, LF or NUL: a value cannot start a header of its own
(header injection). Attachments are base64, checked and counted at submit against the
service's ``attachments_max_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from pydantic import Field

from integrations.errors import InvalidParams
from integrations.services import params as P
from integrations.services.base import Operation

#: Recipients of one message (to, cc and bcc together) at most.
RECIPIENTS_MAX = 100
#: RFC 5322 2.1.1: a line is at most 998 characters; a header value cannot be longer.
HEADER_MAX = 998
#: Headers the operation sets from its own parameters; ``headers`` may not set them.
RESERVED = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "message-id",
        "date",
        "sender",
        "return-path",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        # Resent-*: who a message claims to have been resent by (RFC 5322 3.6.6), a From by another name.
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-date",
        "resent-message-id",
    }
)
#: CR, LF, NUL, and what else Python counts as a line boundary (VT, FF, FS, GS, RS, NEL,
#: U+2028, U+2029): the email package refuses those in a header, so they are refused at submit.
_BREAKS = "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
#: A header name: printable US-ASCII but the colon (RFC 5322 3.6.8).
_HEADER_NAME = r"^[!-9;-~]{1,76}$"
_MIME_TYPE = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
#: What a header value may not contain, as JSON Schema says it (ECMA 262 and Python alike).
_NO_BREAKS: dict[str, Any] = {"not": {"pattern": "[" + _BREAKS + "]"}}


def _address(description: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 3, "maxLength": 320, "description": description, **_NO_BREAKS}


def _addresses(description: str, max_items: int = RECIPIENTS_MAX) -> dict[str, Any]:
    item = _address("ada@example.com or Ada Lovelace <ada@example.com>")
    return {"type": "array", "items": item, "maxItems": max_items, "default": [], "description": description}


def send_schema(attachments_max_bytes: int) -> dict[str, Any]:
    """The JSON Schema of ``send``'s params."""
    props: dict[str, dict[str, Any]] = {
        "from": _address("The sender: ada@example.com or Ada Lovelace <ada@example.com>."),
        "to": {**_addresses("Recipients shown in To."), "minItems": 1},
        "cc": _addresses("Recipients shown in Cc."),
        "bcc": _addresses("Recipients not shown in the message."),
        "reply_to": _addresses("Where replies should go (Reply-To), when not to the sender.", 10),
        "subject": {
            "type": "string",
            "maxLength": HEADER_MAX,
            "description": "The subject line.",
            **_NO_BREAKS,
        },
        "text": {
            "type": "string",
            "maxLength": 1_000_000,
            "writeOnly": True,
            "description": "The plain-text body.",
        },
        "html": {
            "type": "string",
            "writeOnly": True,
            "maxLength": 2_000_000,
            "description": "An HTML body; with text, the message offers both (multipart/alternative).",
        },
        "headers": {
            "type": "object",
            "description": (
                "Extra headers by name, e.g. In-Reply-To and References for a reply. The headers "
                "the other parameters set (From, To, Subject, Message-ID, Date, Content-*...) are refused."
            ),
            "propertyNames": {"pattern": _HEADER_NAME},
            "additionalProperties": {"type": "string", "maxLength": HEADER_MAX, **_NO_BREAKS},
            "maxProperties": 50,
            "default": {},
        },
        "attachments": {
            "type": "array",
            "maxItems": 100,
            "default": [],
            "description": f"Files attached, at most {attachments_max_bytes} bytes in all (decoded).",
            "items": P.object_schema(
                {
                    "filename": {"type": "string", "minLength": 1, "maxLength": 255, **_NO_BREAKS},
                    "content_type": {
                        "type": "string",
                        "pattern": _MIME_TYPE,
                        "default": "application/octet-stream",
                        "description": "A MIME type, e.g. application/pdf or text/csv.",
                    },
                    "content": {
                        "type": "string",
                        "contentEncoding": "base64",
                        "writeOnly": True,
                        "description": "The file's bytes, base64-encoded.",
                    },
                },
                ["filename", "content"],
            ),
        },
    }
    return P.object_schema(
        props, ["from", "to", "subject"], "Send one email. Give text, html or both, and any attachments."
    )


class SendOperation(Operation):
    """``send``: one message to its recipients. Built by :class:`~integrations.services.smtp.
    SmtpService` with the service's attachment bound."""

    description: str = "Send an email (to, cc, bcc, subject, text and/or html, attachments)."
    attachments_max_bytes: int = Field(ge=0)
    #: The addresses (``ada@example.com``) and domains (``@example.com``) ``from`` may name;
    #: empty: any the server accepts.
    senders: tuple[str, ...] = ()

    def build_parameters(self) -> dict[str, Any]:
        return send_schema(self.attachments_max_bytes)

    def validate_params(self, params: Any) -> dict[str, Any]:
        """The schema's checks, with a clear message for a line break in a header value, then
        what the schema cannot say: addresses parse, headers are not reserved, attachments are
        base64 within the bound. Raises :class:`InvalidParams` naming the field."""
        if isinstance(params, dict):
            for where, value in _header_values(params):
                if any(c in value for c in _BREAKS):
                    raise InvalidParams(f"{where}: must not contain a line break (CR, LF, U+2028...) or NUL")
        clean = super().validate_params(params)
        for where, value in _address_values(clean):
            if parse_address(value) is None:
                raise InvalidParams(
                    f"{where}: not an email address (ada@example.com or Name <ada@example.com>)"
                )
        if self.senders and not _allowed_sender(clean["from"], self.senders):
            raise InvalidParams("from: not one of the service's senders")
        if len(recipients(clean)) > RECIPIENTS_MAX:
            raise InvalidParams(f"to, cc, bcc: more than {RECIPIENTS_MAX} recipients in all")
        for name in clean.get("headers", {}):
            if name.lower() in RESERVED:
                raise InvalidParams(f"headers.{name}: set by the operation's own parameters")
        total = 0
        for i, att in enumerate(clean.get("attachments", [])):
            total += len(_decode(att["content"], f"attachments.{i}.content"))
        if total > self.attachments_max_bytes:
            raise InvalidParams(
                f"attachments: larger than {self.attachments_max_bytes} bytes in all (the service's "
                "attachments_max_bytes)"
            )
        return clean


def _header_values(params: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name in ("from", "subject"):
        if isinstance(params.get(name), str):
            out.append((name, params[name]))
    for name in ("to", "cc", "bcc", "reply_to"):
        values = params.get(name)
        if isinstance(values, list):
            out += [(f"{name}.{i}", v) for i, v in enumerate(values) if isinstance(v, str)]
    headers = params.get("headers")
    if isinstance(headers, dict):
        for k, v in headers.items():
            out.append(("headers", str(k)))
            if isinstance(v, str):
                out.append((f"headers.{str(k)[:76]}", v))
    attachments = params.get("attachments")
    if isinstance(attachments, list):
        for i, att in enumerate(attachments):
            if isinstance(att, dict):
                out += [
                    (f"attachments.{i}.{k}", att[k])
                    for k in ("filename", "content_type")
                    if isinstance(att.get(k), str)
                ]
    return out


def _address_values(clean: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("from", clean["from"])]
    for name in ("to", "cc", "bcc", "reply_to"):
        out += [(f"{name}.{i}", v) for i, v in enumerate(clean.get(name, []))]
    return out


def _allowed_sender(value: str, senders: tuple[str, ...]) -> bool:
    address = parse_address(value)
    if address is None:
        return False
    addr, domain = address.addr_spec.lower(), "@" + address.domain.lower()
    return any(s.lower() in (addr, domain) for s in senders)


def parse_address(value: str) -> Address | None:
    """One address (``ada@example.com`` or ``Ada <ada@example.com>``), or ``None``."""
    try:
        header = email.policy.default.header_factory("to", value)
        found = list(getattr(header, "addresses", ()))
    except (ValueError, IndexError, TypeError):
        return None
    if len(found) != 1 or header.defects or not found[0].username or "." not in found[0].domain:
        return None
    address: Address = found[0]
    return address


def recipients(clean: dict[str, Any]) -> list[str]:
    """The envelope's recipients (to, cc and bcc), each once, in order."""
    seen: dict[str, None] = {}
    for name in ("to", "cc", "bcc"):
        for value in clean.get(name, []):
            address = parse_address(value)
            if address is not None:
                seen.setdefault(address.addr_spec, None)
    return list(seen)


def _decode(content: str, where: str) -> bytes:
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams(f"{where}: not valid base64") from None


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: list[str]
    data: bytes
    #: Whether an address is not ASCII: the server must offer SMTPUTF8 (RFC 6531).
    utf8: bool


def message_id(job_id: str, clean: dict[str, Any], domain: str | None) -> str:
    """``<job-id@domain>``: the same on every attempt of a job, so a retry after a lost reply
    is recognisable downstream. ``domain``: the service's, else the sender's."""
    sender = parse_address(clean["from"])
    host = domain or (sender.domain if sender else "") or "localhost"
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        host = "localhost"
    return f"<{job_id}@{host}>"


def build(clean: dict[str, Any], msg_id: str) -> Envelope:
    """The message of validated params ``clean``, and its envelope. Bcc is in the envelope only."""
    to = recipients(clean)
    sender = parse_address(clean["from"])
    assert sender is not None  # checked at submit
    utf8 = not all(a.isascii() for a in (sender.addr_spec, *to))
    # 7bit unless an address needs UTF-8: bodies go quoted-printable or base64, which any
    # server takes; with SMTPUTF8 (RFC 6531) the server takes 8-bit as well.
    policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP.clone(cte_type="7bit")
    msg = EmailMessage(policy=policy)
    msg["From"] = clean["from"]
    msg["To"] = ", ".join(clean["to"])
    if clean.get("cc"):
        msg["Cc"] = ", ".join(clean["cc"])
    if clean.get("reply_to"):
        msg["Reply-To"] = ", ".join(clean["reply_to"])
    msg["Subject"] = clean.get("subject", "")
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = msg_id
    for name, value in clean.get("headers", {}).items():
        msg[name] = value
    text, html = clean.get("text"), clean.get("html")
    if html is not None and text is None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(text or "")
        if html is not None:
            msg.add_alternative(html, subtype="html")
    for att in clean.get("attachments", []):
        maintype, _, subtype = att.get("content_type", "application/octet-stream").partition("/")
        msg.add_attachment(
            base64.b64decode(att["content"]), maintype=maintype, subtype=subtype, filename=att["filename"]
        )
    return Envelope(sender.addr_spec, to, msg.as_bytes(), utf8)
