"""The operations of the ``s3`` kind: their JSON Schemas (what an agent sees as tools) and the
checks a schema cannot make. The calls themselves are in :mod:`integrations.services.s3`."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from integrations.errors import InvalidParams
from integrations.services import params as P
from integrations.services.base import Operation

#: SigV4 presigned URLs live at most 7 days
#: (https://docs.aws.amazon.com/AmazonS3/latest/userguide/ShareObjectPreSignedURL.html).
PRESIGN_MAX_SECONDS = 7 * 24 * 3600
LIST_MAX_KEYS = 1000

KEY = {
    "type": "string",
    "minLength": 1,
    "maxLength": 1024,
    "description": "The object's key: its path in the bucket, e.g. reports/2024/q1.pdf.",
}


class S3Operation(Operation):
    """A built-in operation: ``action`` names what :class:`~integrations.services.s3.S3Service`
    does; ``properties`` and ``required`` are its parameters' schema."""

    action: str
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...] = ()

    def build_parameters(self) -> dict[str, Any]:
        return P.object_schema(self.properties, list(self.required), self.description)

    def validate_params(self, params: Any) -> dict[str, Any]:
        clean = super().validate_params(params)
        if self.action == "put_object" and clean.get("encoding") == "base64":
            try:
                base64.b64decode(clean["content"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidParams("content: not valid base64 (encoding is base64)") from None
        return clean


def catalog(max_object_bytes: int) -> dict[str, S3Operation]:
    """The operations of an S3 service whose reads are bounded to ``max_object_bytes``."""
    ops = [
        S3Operation(
            action="put_object",
            description="Store an object under a key, replacing any object already there.",
            properties={
                "key": KEY,
                "content": {
                    "type": "string",
                    "writeOnly": True,
                    "description": "The object's content: text, or base64 when encoding is base64.",
                },
                "encoding": {
                    "type": "string",
                    "enum": ["text", "base64"],
                    "default": "text",
                    "description": "How content is given: text (stored as UTF-8) or base64 (binary).",
                },
                "content_type": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[\\x21-\\x7e][\\x20-\\x7e]*$",
                    "description": "The MIME type stored with the object; default text/plain; "
                    "charset=utf-8 for text, application/octet-stream for base64.",
                },
                "metadata": {
                    "type": "object",
                    "maxProperties": 20,
                    "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"},
                    "additionalProperties": {
                        "type": "string",
                        "maxLength": 1024,
                        "pattern": "^[\\x20-\\x7e]*$",
                    },
                    "description": "User metadata stored with the object (x-amz-meta-*): names of "
                    "letters, digits, '-' and '_'; printable ASCII values.",
                },
            },
            required=("key", "content"),
        ),
        S3Operation(
            action="get_object",
            description=f"Read an object: at most max_bytes of it (up to {max_object_bytes}), "
            "as text or base64; says whether it was cut short.",
            properties={
                "key": KEY,
                "encoding": {
                    "type": "string",
                    "enum": ["auto", "text", "base64"],
                    "default": "auto",
                    "description": "auto: text when the object is UTF-8, else base64.",
                },
                "max_bytes": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": max_object_bytes,
                    "default": max_object_bytes,
                    "description": "Read at most this many bytes; a longer object comes back truncated.",
                },
            },
            required=("key",),
        ),
        S3Operation(
            action="list_objects",
            description="List keys (with size and last change), a page at a time; pass next_token "
            "back as continuation_token for the next page.",
            properties={
                "prefix": {
                    "type": "string",
                    "maxLength": 1024,
                    "default": "",
                    "description": "Only keys that start with this.",
                },
                "delimiter": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 16,
                    "description": "Group keys by this (usually /): the groups come back as prefixes.",
                },
                "max_keys": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": LIST_MAX_KEYS,
                    "default": LIST_MAX_KEYS,
                    "description": "Keys per page.",
                },
                "continuation_token": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 4096,
                    "description": "The next_token of the previous page.",
                },
            },
        ),
        S3Operation(
            action="head_object",
            description="An object's size, type, ETag, last change and metadata, without its content.",
            properties={"key": KEY},
            required=("key",),
        ),
        S3Operation(
            action="delete_object",
            description="Delete an object (deleting a key that does not exist succeeds).",
            properties={"key": KEY},
            required=("key",),
        ),
        S3Operation(
            action="presign",
            description="A URL that lets anyone holding it download (get) or upload (put) one "
            "object until it expires, without credentials.",
            properties={
                "key": KEY,
                "method": {
                    "type": "string",
                    "enum": ["get", "put"],
                    "default": "get",
                    "description": "get: download the object; put: upload it (with an HTTP PUT).",
                },
                "expires_in": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": PRESIGN_MAX_SECONDS,
                    "default": 3600,
                    "description": "Seconds the URL works for (at most 7 days).",
                },
                "content_type": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[\\x21-\\x7e][\\x20-\\x7e]*$",
                    "description": "For put: the Content-Type the upload must send (signed into the URL).",
                },
            },
            required=("key",),
        ),
    ]
    return {op.action: op for op in ops}
