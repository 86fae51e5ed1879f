"""A stand-in for Slack's Web API on loopback, for tests/test_slack.py.

It answers with the bodies of Slack's method documentation (each cited where it is built),
checks the bot token on every method as Slack does (``not_authed`` without one,
``invalid_auth`` for another), reads arguments the way each method takes them (JSON bodies
only for the methods that accept JSON; a JSON body without ``charset=utf-8`` earns Slack's
``missing_charset`` warning), and serves the upload URLs of ``files.getUploadURLExternal`` on a
second port: another origin, which records what arrives there.

A test can script the next answers of a method (:meth:`SlackStandIn.script`), optionally only
for calls whose argument has a given value. Every call is recorded with its arrival time.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: The methods whose pages list application/json among their content types.
JSON_METHODS = {"chat.postMessage", "chat.update", "reactions.add", "files.completeUploadExternal"}


@dataclass
class Reply:
    """A scripted answer: the status, the body (a JSON value) and the headers."""

    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    at: float
    method: str
    http_method: str
    headers: dict[str, str]
    args: dict[str, Any]
    body: bytes
    status: int = 0
    answer: Any = None


@dataclass
class Upload:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Channel:
    #: Messages, oldest first, each as conversations.history shows one.
    messages: list[dict[str, Any]] = field(default_factory=list)
    reactions: set[tuple[str, str]] = field(default_factory=set)


# https://docs.slack.dev/reference/methods/conversations.list: the channels of the page's two
# example responses (public channels; an mpim and two ims).
DOC_CHANNELS: list[dict[str, Any]] = [
    {
        "id": "C012AB3CD",
        "name": "general",
        "is_channel": True,
        "is_group": False,
        "is_im": False,
        "created": 1449252889,
        "creator": "U012A3CDE",
        "is_archived": False,
        "is_general": True,
        "unlinked": 0,
        "name_normalized": "general",
        "is_shared": False,
        "is_ext_shared": False,
        "is_org_shared": False,
        "pending_shared": [],
        "is_pending_ext_shared": False,
        "is_member": True,
        "is_private": False,
        "is_mpim": False,
        "updated": 1678229664302,
        "topic": {"value": "Company-wide announcements and work-based matters", "creator": "", "last_set": 0},
        "purpose": {
            "value": "This channel is for team-wide communication and announcements. All team members "
            "are in this channel.",
            "creator": "",
            "last_set": 0,
        },
        "previous_names": [],
        "num_members": 4,
    },
    {
        "id": "C061EG9T2",
        "name": "random",
        "is_channel": True,
        "is_group": False,
        "is_im": False,
        "created": 1449252889,
        "creator": "U061F7AUR",
        "is_archived": False,
        "is_general": False,
        "unlinked": 0,
        "name_normalized": "random",
        "is_shared": False,
        "is_ext_shared": False,
        "is_org_shared": False,
        "pending_shared": [],
        "is_pending_ext_shared": False,
        "is_member": True,
        "is_private": False,
        "is_mpim": False,
        "updated": 1678229664302,
        "topic": {"value": "Non-work banter and water cooler conversation", "creator": "", "last_set": 0},
        "purpose": {
            "value": "A place for non-work-related flimflam, faffing, hodge-podge or jibber-jabber "
            "you'd prefer to keep out of more focused work-related channels.",
            "creator": "",
            "last_set": 0,
        },
        "previous_names": [],
        "num_members": 4,
    },
    {
        "id": "G0AKFJBEU",
        "name": "mpdm-mr.banks--slactions-jackson--beforebot-1",
        "is_channel": False,
        "is_group": True,
        "is_im": False,
        "created": 1493657761,
        "creator": "U061F7AUR",
        "is_archived": False,
        "is_general": False,
        "unlinked": 0,
        "name_normalized": "mpdm-mr.banks--slactions-jackson--beforebot-1",
        "is_shared": False,
        "is_ext_shared": False,
        "is_org_shared": False,
        "pending_shared": [],
        "is_pending_ext_shared": False,
        "is_member": True,
        "is_private": True,
        "is_mpim": True,
        "is_open": True,
        "updated": 1678229664302,
        "topic": {"value": "Group messaging", "creator": "U061F7AUR", "last_set": 1493657761},
        "purpose": {
            "value": "Group messaging with: @mr.banks @slactions-jackson @beforebot",
            "creator": "U061F7AUR",
            "last_set": 1493657761,
        },
        "priority": 0,
    },
    {
        "id": "D0C0F7S8Y",
        "created": 1498500348,
        "is_im": True,
        "is_org_shared": False,
        "user": "U0BS9U4SV",
        "is_user_deleted": False,
        "priority": 0,
    },
    {
        "id": "D0BSHH4AD",
        "created": 1498511030,
        "is_im": True,
        "is_org_shared": False,
        "user": "U0C0NS9HN",
        "is_user_deleted": False,
        "priority": 0,
    },
]

# https://docs.slack.dev/reference/methods/users.lookupByEmail: the page's example user.
DOC_USER: dict[str, Any] = {
    "id": "W012A3CDE",
    "team_id": "T012AB3C4",
    "name": "spengler",
    "deleted": False,
    "color": "9f69e7",
    "real_name": "Egon Spengler",
    "tz": "America/Los_Angeles",
    "tz_label": "Pacific Daylight Time",
    "tz_offset": -25200,
    "profile": {
        "avatar_hash": "ge3b51ca72de",
        "status_text": "Print is dead",
        "status_emoji": ":books:",
        "real_name": "Egon Spengler",
        "display_name": "spengler",
        "real_name_normalized": "Egon Spengler",
        "display_name_normalized": "spengler",
        "email": "spengler@ghostbusters.example.com",
        "image_24": "https://.../avatar/e3b51ca72dee4ef87916ae2b9240df50.jpg",
        "image_32": "https://.../avatar/e3b51ca72dee4ef87916ae2b9240df50.jpg",
        "image_48": "https://.../avatar/e3b51ca72dee4ef87916ae2b9240df50.jpg",
        "image_72": "https://.../avatar/e3b51ca72dee4ef87916ae2b9240df50.jpg",
        "image_192": "https://.../avatar/e3b51ca72dee4ef87916ae2b9240df50.jpg",
        "image_512": "https://.../avatar/e3b51ca72dee4ef87916ae2b9240df50.jpg",
        "team": "T012AB3C4",
    },
    "is_admin": True,
    "is_owner": False,
    "is_primary_owner": False,
    "is_restricted": False,
    "is_ultra_restricted": False,
    "is_bot": False,
    "updated": 1502138686,
    "is_app_user": False,
    "has_2fa": False,
}


def error(code: str, **more: Any) -> dict[str, Any]:
    """Slack's failure body, as every method page shows it: ``{"ok": false, "error": code}``."""
    return {"ok": False, "error": code, **more}


class SlackStandIn:
    """The Web API on ``port`` (``/api/<method>``) and the upload host on ``files_port``."""

    def __init__(self, token: str, port: int, files_port: int) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.uploads: list[Upload] = []
        self.channels: dict[str, Channel] = defaultdict(Channel)
        self.tickets: dict[str, tuple[str, int]] = {}  # ticket -> (file_id, declared length)
        self.received: dict[str, int] = {}  # file_id -> bytes that arrived
        self.scripts: dict[tuple[str, str | None, Any], deque[Reply]] = defaultdict(deque)
        self._ts = itertools.count(1)
        self.api = _Server(("127.0.0.1", port), _ApiHandler, self)
        self.files = _Server(("127.0.0.1", files_port), _FilesHandler, self)
        self.files_url = f"http://127.0.0.1:{files_port}"  # another port: another origin

    def start(self) -> SlackStandIn:
        for server in (self.api, self.files):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self.api, self.files):
            server.shutdown()
            server.server_close()

    # ---- what tests use ------------------------------------------------------------------------

    def script(self, method: str, *replies: Reply, arg: str | None = None, value: Any = None) -> None:
        """Answer the next calls of ``method`` (those whose ``arg`` is ``value``, if given) so."""
        with self.lock:
            self.scripts[(method, arg, value)].extend(replies)

    def seed(self, channel: str, count: int) -> list[str]:
        """``count`` messages in ``channel``'s history, shaped as in conversations.history's
        example response; their ts, oldest first."""
        with self.lock:
            msgs = self.channels[channel].messages
            for _ in range(count):
                n = next(self._ts)
                msgs.append(
                    {
                        "type": "message",
                        "user": "U123ABC456",
                        "text": f"message {n}",
                        "ts": f"1512085950.{n:06d}",
                    }
                )
            return [m["ts"] for m in msgs]

    def calls_of(self, method: str, **args: Any) -> list[Call]:
        with self.lock:
            return [
                c
                for c in self.calls
                if c.method == method and all(c.args.get(k) == v for k, v in args.items())
            ]

    # ---- the methods ---------------------------------------------------------------------------

    def answer(self, method: str, args: dict[str, Any], files_url: str) -> Any:
        for arg, value in [(k, v) for k, v in args.items() if isinstance(v, str | int)] + [(None, None)]:
            scripted = self.scripts.get((method, arg, value))
            if scripted:
                return scripted.popleft()
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        return handler(args) if handler is not None else error("unknown_method")

    def _auth_test(self, args: dict[str, Any]) -> Any:
        # https://docs.slack.dev/reference/methods/auth.test: the example response.
        return {
            "ok": True,
            "url": "https://myteam.slack.com/",
            "team": "My Team",
            "user": "cal",
            "team_id": "T12345",
            "user_id": "U12345",
        }

    def _chat_postMessage(self, args: dict[str, Any]) -> Any:
        channel = args.get("channel")
        if not channel:
            return error("channel_not_found")
        if not args.get("text") and not args.get("blocks"):
            return error("no_text")
        ts = f"{int(time.time())}.{next(self._ts):06d}"
        text = args.get("text", "")
        self.channels[channel].messages.append({"type": "message", "user": "U0BOT", "text": text, "ts": ts})
        # https://docs.slack.dev/reference/methods/chat.postMessage: the example response, with
        # this message's channel, ts and text.
        message: dict[str, Any] = {
            "text": text,
            "username": "ecto1",
            "bot_id": "B19LU7CSY",
            "type": "message",
            "subtype": "bot_message",
            "ts": ts,
        }
        if args.get("blocks"):
            message["blocks"] = args["blocks"]
        if args.get("thread_ts"):
            message["thread_ts"] = args["thread_ts"]
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _chat_update(self, args: dict[str, Any]) -> Any:
        channel, ts = args.get("channel", ""), args.get("ts")
        found = (
            [m for m in self.channels[channel].messages if m["ts"] == ts] if channel in self.channels else []
        )
        if not found:
            return error("message_not_found")
        if args.get("text"):
            found[0]["text"] = args["text"]
        # https://docs.slack.dev/reference/methods/chat.update: the example response.
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "text": found[0]["text"],
            "message": {"text": found[0]["text"], "user": "U34567890"},
        }

    def _reactions_add(self, args: dict[str, Any]) -> Any:
        channel, ts, name = args.get("channel", ""), args.get("timestamp"), args.get("name", "")
        if channel not in self.channels:
            return error("channel_not_found")
        if not any(m["ts"] == ts for m in self.channels[channel].messages):
            return error("message_not_found")
        reactions = self.channels[channel].reactions
        if (str(ts), name) in reactions:
            # https://docs.slack.dev/reference/methods/reactions.add: the error example.
            return {"error": "already_reacted", "ok": False}
        reactions.add((str(ts), name))
        return {"ok": True}  # the page's example response

    def _conversations_history(self, args: dict[str, Any]) -> Any:
        channel = args.get("channel", "")
        if channel not in self.channels:
            return error("channel_not_found")  # the page's error example
        oldest, latest = float(args.get("oldest", 0)), float(args.get("latest", 1e12))
        msgs = [m for m in reversed(self.channels[channel].messages) if oldest < float(m["ts"]) < latest]
        start = _offset(args.get("cursor"), [m["ts"] for m in msgs], "next_ts:")
        if start is None:
            return error("invalid_cursor")
        limit = int(args.get("limit", 100))
        page, rest = msgs[start : start + limit], msgs[start + limit :]
        # https://docs.slack.dev/reference/methods/conversations.history: the shape of the
        # example responses (next_cursor is base64 of "next_ts:<ts>", as there).
        return {
            "ok": True,
            "messages": page,
            "has_more": bool(rest),
            "pin_count": 0,
            "response_metadata": {"next_cursor": _cursor("next_ts:", rest[0]["ts"]) if rest else ""},
        }

    def _conversations_list(self, args: dict[str, Any]) -> Any:
        types = str(args.get("types", "public_channel")).split(",")
        unknown = set(types) - {"public_channel", "private_channel", "mpim", "im"}
        if unknown:
            return error("invalid_types")
        chans = [c for c in DOC_CHANNELS if _type_of(c) in types]
        if args.get("exclude_archived") == "true":
            chans = [c for c in chans if not c.get("is_archived")]
        start = _offset(args.get("cursor"), [c["id"] for c in chans], "team:")
        if start is None:
            return error("invalid_cursor")
        limit = int(args.get("limit", 100))
        page, rest = chans[start : start + limit], chans[start + limit :]
        # The example responses' shape; next_cursor is base64 of "team:<id>" as there.
        return {
            "ok": True,
            "channels": page,
            "response_metadata": {"next_cursor": _cursor("team:", rest[0]["id"]) if rest else ""},
        }

    def _users_lookupByEmail(self, args: dict[str, Any]) -> Any:
        if args.get("email") != DOC_USER["profile"]["email"]:
            return error("users_not_found")  # the page's error example
        return {"ok": True, "user": DOC_USER}

    def _files_getUploadURLExternal(self, args: dict[str, Any]) -> Any:
        if not args.get("filename") or not str(args.get("length", "")).isdigit():
            return error("invalid_arguments")
        if int(args["length"]) == 0:
            return error("missing_argument")
        n = next(self._ts)
        file_id, ticket = f"F{n:09d}", f"ABC{n:06d}"
        self.tickets[ticket] = (file_id, int(args["length"]))
        # https://docs.slack.dev/reference/methods/files.getUploadURLExternal: the example
        # response, its upload URL on the stand-in's upload host.
        return {"ok": True, "upload_url": f"{self.files_url}/upload/v1/{ticket}", "file_id": file_id}

    def _files_completeUploadExternal(self, args: dict[str, Any]) -> Any:
        files = args.get("files")
        if not isinstance(files, list) or not files:
            return error("invalid_arguments")
        declared = {fid: length for fid, length in self.tickets.values()}
        for f in files:
            if declared.get(f.get("id")) is None or self.received.get(f["id"]) != declared[f["id"]]:
                return error("file_not_found")  # "Could not find the file from the upload ticket."
        # https://docs.slack.dev/reference/methods/files.completeUploadExternal: the example response.
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title", "")} for f in files]}

    def receive(self, path: str, body: bytes) -> int:
        """An upload arriving at the upload host: 200 for a known ticket, else 404."""
        ticket = path.rsplit("/", 1)[-1]
        if ticket not in self.tickets:
            return 404
        self.received[self.tickets[ticket][0]] = len(body)
        return 200


def _type_of(channel: dict[str, Any]) -> str:
    if channel.get("is_im"):
        return "im"
    if channel.get("is_mpim"):
        return "mpim"
    return "private_channel" if channel.get("is_private") else "public_channel"


def _cursor(prefix: str, key: str) -> str:
    return base64.b64encode(f"{prefix}{key}".encode()).decode()


def _offset(cursor: Any, keys: list[str], prefix: str) -> int | None:
    """Where a page starts: 0 without a cursor, the index of the cursor's key, or ``None``."""
    if not cursor:
        return 0
    try:
        key = base64.b64decode(str(cursor), validate=True).decode().removeprefix(prefix)
        return keys.index(key)
    except ValueError:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], slack: SlackStandIn):
        super().__init__(address, handler)
        self.slack = slack

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up are part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _ApiHandler(_Handler):
    def _handle(self) -> None:
        at = time.time()
        parts = urlsplit(self.path)
        method = parts.path.removeprefix("/api/")
        raw = self._read()
        headers = {k.lower(): v for k, v in self.headers.items()}
        args, warning = _arguments(method, parts.query, headers.get("content-type", ""), raw)
        slack = self.server.slack
        call = Call(at, method, self.command, headers, args, raw)
        with slack.lock:
            slack.calls.append(call)
            auth = headers.get("authorization")
            if auth is None:
                reply = Reply(error("not_authed"))
            elif auth != f"Bearer {slack.token}":
                reply = Reply(error("invalid_auth"))
            else:
                found = slack.answer(method, args, slack.files_url)
                reply = found if isinstance(found, Reply) else Reply(found)
            body = reply.body
            if warning and isinstance(body, dict):
                # Slack's answer to a JSON body without a charset:
                # https://api.slack.com/changelog/2016-09-28-response-metadata-is-on-the-way
                meta = {**body.get("response_metadata", {}), "warnings": [warning]}
                body = {**body, "warning": warning, "response_metadata": meta}
            call.status, call.answer = reply.status, body
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self._send(reply.status, data, "application/json; charset=utf-8", reply.headers)

    do_GET = do_POST = _handle


class _FilesHandler(_Handler):
    def _handle(self) -> None:
        at = time.time()
        raw = self._read()
        slack = self.server.slack
        with slack.lock:
            slack.uploads.append(Upload(at, self.path, {k.lower(): v for k, v in self.headers.items()}, raw))
            status = slack.receive(self.path, raw)
        # The upload host answers 200 and a line of text to a good upload.
        self._send(status, f"OK - {len(raw)}".encode() if status == 200 else b"", "text/plain")

    do_POST = do_PUT = _handle


def _arguments(method: str, query: str, content_type: str, raw: bytes) -> tuple[dict[str, Any], str | None]:
    """The call's arguments as Slack reads them: the query, a form body, or a JSON body (for
    the methods that take JSON; others ignore it), and the warning the call earns."""
    args: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query).items()}
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        args |= {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
    elif kind == "application/json" and method in JSON_METHODS:
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return args, None
        if isinstance(data, dict):
            args |= data
    warning = "missing_charset" if kind == "application/json" and "charset=" not in content_type else None
    return args, warning
