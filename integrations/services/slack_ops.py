"""The slack kind's built-in operations: which Web API method each calls, how its arguments
travel, the method's rate-limit tier, and the JSON Schema of its params.

Descriptions follow Slack's method documentation (https://docs.slack.dev/reference/methods/);
params keep Slack's argument names, so what an agent knows of the Web API holds here.

How arguments travel, per the "Content types" and "Method access" of each method's page: write
methods take a JSON body (``Content-Type: application/json; charset=utf-8``); the read methods
(``conversations.history``, ``conversations.list``, ``users.lookupByEmail``) take no JSON, so
their arguments go in the query of a GET; ``files.getUploadURLExternal`` takes a form.

Tiers (https://docs.slack.dev/apis/web-api/rate-limits): Tier 1 is 1+ calls a minute, Tier 2
20+, Tier 3 50+, Tier 4 100+, per method, app and workspace; ``chat.postMessage`` is special:
about one message a second per channel, beside a workspace-wide limit of "several hundred
messages per minute".
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from integrations.config.schema import Rate
from integrations.errors import InvalidParams
from integrations.services.base import Operation
from integrations.services.params import object_schema

#: How a method's arguments travel: a JSON body, the query of a GET, or a form body.
Wire = Literal["json", "query", "form"]


@dataclass(frozen=True)
class Method:
    """A Web API method this kind calls: how its arguments travel, its tier (``None``:
    special), and the limit the global limiter holds it to unless the services file says
    otherwise (``method_limits``)."""

    wire: Wire
    tier: int | None
    limit: Rate


#: What each tier allows, as the limiter counts: the tier's floor per minute, with a small burst.
TIERS = {1: Rate(1 / 60, 1), 2: Rate(20 / 60, 2), 3: Rate(50 / 60, 5), 4: Rate(100 / 60, 10)}

METHODS: dict[str, Method] = {
    # Special: ~1 a second per channel (the channel limit) and "several hundred a minute" for
    # the workspace: https://docs.slack.dev/reference/methods/chat.postMessage#rate-limiting
    "chat.postMessage": Method("json", None, Rate(300 / 60, 5)),
    "chat.update": Method("json", 3, TIERS[3]),
    "reactions.add": Method("json", 3, TIERS[3]),
    "conversations.history": Method("query", 3, TIERS[3]),
    "conversations.list": Method("query", 2, TIERS[2]),
    "users.lookupByEmail": Method("query", 3, TIERS[3]),
    "files.getUploadURLExternal": Method("form", 4, TIERS[4]),
    "files.completeUploadExternal": Method("json", 4, TIERS[4]),
}
#: The health check's method (special tier; not an operation, so not limited here).
AUTH_TEST = "auth.test"

#: A message timestamp: Slack's ``ts`` ("1503435956.000247").
TS = r"^[0-9]+\.[0-9]+$"
#: A Unix timestamp as Slack takes it for ``oldest`` and ``latest``, fraction optional.
UNIX_TS = r"^[0-9]+(\.[0-9]+)?$"
CONVERSATION_TYPES = ["public_channel", "private_channel", "mpim", "im"]


class SlackOperation(Operation):
    """One built-in operation: the Web API ``methods`` it calls (two for an upload) and its params."""

    methods: tuple[str, ...]
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...] = ()
    #: The param naming the channel whose posting limit applies (``channel:<id>``).
    channel_param: str | None = None
    #: At least one of these params must be given (text or blocks).
    one_of: tuple[str, ...] = ()
    #: Params given to the method as a comma-separated list.
    comma_lists: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return self.methods[0]

    @property
    def wire(self) -> Wire:
        return METHODS[self.method].wire

    def build_parameters(self) -> dict[str, Any]:
        return object_schema(self.properties, list(self.required), self.description)

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        if self.one_of and not any(k in clean for k in self.one_of):
            raise InvalidParams(f"{' or '.join(self.one_of)}: give at least one of them")
        if "thread_ts" in clean and "channel_id" in self.properties and "channel_id" not in clean:
            raise InvalidParams("thread_ts: a reply goes in a channel; give channel_id too")
        if clean.get("encoding") == "base64":
            try:
                base64.b64decode(clean["content"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidParams("content: not valid base64") from None
        return clean

    def arguments(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The method's arguments from validated params (lists Slack takes as text joined)."""
        return {k: ",".join(v) if k in self.comma_lists else v for k, v in params.items()}


def _s(description: str, **rules: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **rules}


def _b(description: str, default: bool) -> dict[str, Any]:
    return {"type": "boolean", "default": default, "description": description}


BLOCKS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 50,
    "items": {
        "type": "object",
        "properties": {
            "type": _s("The block's type: section, header, divider, context, actions, image, rich_text, ...")
        },
        "required": ["type"],
    },
}
CURSOR = _s(
    "Paginate through collections of data by setting the cursor parameter to a next_cursor "
    "attribute returned by a previous request's response_metadata. Default value fetches the "
    'first "page" of the collection.',
    minLength=1,
)


def _limit(what: str) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": 999,
        "default": 100,
        "description": f"The maximum number of items to return. Fewer than the requested number of "
        f"items may be returned, even if the end of the {what} hasn't been reached.",
    }


@functools.cache
def catalog() -> dict[str, SlackOperation]:
    """The operations of a slack service, by name (the same for every slack service)."""
    return {
        "post_message": SlackOperation(
            description="Sends a message to a channel (chat.postMessage). Give text, blocks, or "
            "both (text is then the fallback shown in notifications).",
            methods=("chat.postMessage",),
            channel_param="channel",
            one_of=("text", "blocks"),
            required=("channel",),
            properties={
                "channel": _s(
                    "An encoded ID or channel name that represents a channel, private group, or "
                    "IM channel to send the message to.",
                    minLength=1,
                ),
                "text": _s(
                    "The message text (Slack mrkdwn). Required unless blocks are given, then the "
                    "fallback text for notifications. Provide no more than 40,000 characters or "
                    "risk truncation.",
                    minLength=1,
                    maxLength=40000,
                ),
                "blocks": {**BLOCKS, "description": "A JSON-based array of structured blocks (Block Kit)."},
                "thread_ts": _s(
                    "Provide another message's ts value to make this message a reply. Avoid using "
                    "a reply's ts value; use its parent instead.",
                    pattern=TS,
                ),
                "reply_broadcast": _b(
                    "Used in conjunction with thread_ts and indicates whether reply should be made "
                    "visible to everyone in the channel or conversation.",
                    False,
                ),
                "mrkdwn": _b("Disable Slack markup parsing by setting to false.", True),
                "unfurl_links": _b("Pass true to enable unfurling of primarily text-based content.", False),
                "unfurl_media": _b("Pass false to disable unfurling of media content.", True),
            },
        ),
        "update_message": SlackOperation(
            description="Updates a message (chat.update): its text, its blocks, or both.",
            methods=("chat.update",),
            one_of=("text", "blocks"),
            required=("channel", "ts"),
            properties={
                "channel": _s(
                    "Channel containing the message to be updated. For direct messages, ensure "
                    "that this value is a DM ID (starts with D) instead of a User ID (starts with "
                    "either U or W).",
                    minLength=1,
                ),
                "ts": _s("Timestamp of the message to be updated.", pattern=TS),
                "text": _s(
                    "The new message text. Required unless blocks are given, then the fallback "
                    "text for notifications.",
                    minLength=1,
                    maxLength=40000,
                ),
                "blocks": {
                    **BLOCKS,
                    "description": "The message's new blocks (Block Kit), replacing the old.",
                },
                "reply_broadcast": _b(
                    "Broadcast an existing thread reply to make it visible to everyone in the "
                    "channel or conversation.",
                    False,
                ),
            },
        ),
        "add_reaction": SlackOperation(
            description="Adds a reaction (emoji) to a message (reactions.add).",
            methods=("reactions.add",),
            required=("channel", "timestamp", "name"),
            properties={
                "channel": _s("Channel where the message to add reaction to was posted.", minLength=1),
                "timestamp": _s("Timestamp of the message to add reaction to.", pattern=TS),
                "name": _s(
                    "Reaction (emoji) name, without colons: thumbsup, not :thumbsup:.",
                    pattern=r"^[^:\s][^\s]*$",
                    maxLength=100,
                ),
            },
        ),
        "conversation_history": SlackOperation(
            description="Fetches a conversation's history of messages and events "
            "(conversations.history), newest first, a page at a time: pass the "
            "response_metadata.next_cursor of one page as cursor to get the next.",
            methods=("conversations.history",),
            required=("channel",),
            properties={
                "channel": _s("Conversation ID to fetch history for.", minLength=1),
                "limit": _limit("conversation history"),
                "cursor": CURSOR,
                "oldest": _s(
                    "Only messages after this Unix timestamp will be included in results.",
                    pattern=UNIX_TS,
                    default="0",
                ),
                "latest": _s(
                    "Only messages before this Unix timestamp will be included in results. "
                    "Default is the current time.",
                    pattern=UNIX_TS,
                ),
                "inclusive": _b(
                    "Include messages with oldest or latest timestamps in results. Ignored unless "
                    "either timestamp is specified.",
                    False,
                ),
            },
        ),
        "list_conversations": SlackOperation(
            description="Lists all channels in a Slack team (conversations.list), a page at a "
            "time: pass the response_metadata.next_cursor of one page as cursor to get the next.",
            methods=("conversations.list",),
            comma_lists=("types",),
            properties={
                "types": {
                    "type": "array",
                    "items": {"type": "string", "enum": CONVERSATION_TYPES},
                    "minItems": 1,
                    "uniqueItems": True,
                    "default": ["public_channel"],
                    "description": "Mix and match channel types by providing any combination of "
                    "public_channel, private_channel, mpim, im.",
                },
                "exclude_archived": _b("Set to true to exclude archived channels from the list.", False),
                "limit": _limit("list"),
                "cursor": CURSOR,
                "team_id": _s(
                    "Encoded team id to list channels in, required if token belongs to org-wide app.",
                    minLength=1,
                ),
            },
        ),
        "lookup_user_by_email": SlackOperation(
            description="Finds a user with an email address (users.lookupByEmail).",
            methods=("users.lookupByEmail",),
            required=("email",),
            properties={
                "email": _s("An email address belonging to a user in the workspace.", format="email"),
            },
        ),
        "upload_file": SlackOperation(
            description="Uploads a file and shares it in a channel, or keeps it private without "
            "channel_id (files.getUploadURLExternal, the upload, files.completeUploadExternal).",
            methods=("files.getUploadURLExternal", "files.completeUploadExternal"),
            required=("filename", "content"),
            properties={
                "filename": _s("Name of the file being uploaded.", minLength=1, maxLength=255),
                "content": _s(
                    "The file's content: text, or base64 when encoding is base64.",
                    minLength=1,
                ),
                "encoding": {
                    "type": "string",
                    "enum": ["text", "base64"],
                    "default": "text",
                    "description": "text: content is the file's text (sent as UTF-8); base64: "
                    "content is the base64 of the file's bytes.",
                },
                "title": _s("Title of the file.", minLength=1, maxLength=255),
                "alt_txt": _s("Description of image for screen-reader.", minLength=1, maxLength=1000),
                "snippet_type": _s("Syntax type of the snippet being uploaded (python, ...).", minLength=1),
                "channel_id": _s(
                    "Channel ID where the file will be shared. If not specified the file will be private.",
                    minLength=1,
                ),
                "initial_comment": _s(
                    "The message text introducing the file in the channel.", minLength=1, maxLength=40000
                ),
                "thread_ts": _s(
                    "Provide another message's ts value to upload this file as a reply. Never use "
                    "a reply's ts value; use its parent instead.",
                    pattern=TS,
                ),
            },
        ),
    }
