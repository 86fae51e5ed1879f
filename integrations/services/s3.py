"""Object storage over the S3 API (AWS, or an S3-compatible store: MinIO, R2, Ceph): one bucket
per service, six built-in operations (:mod:`integrations.services.s3ops`).

::

    reports:
      kind: s3
      bucket: acme-reports
      region: eu-west-1
      endpoint_url: https://minio.internal:9000     # leave out for AWS
      access_key_id: ${REPORTS_S3_KEY_ID}
      secret_access_key: ${REPORTS_S3_SECRET}
      health: {interval: 60}                        # HeadBucket

boto3 makes one attempt per call (its own retries are off): Celery retries the job. Every
connection goes through the SSRF guard, to the address it judged.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator

from integrations import redact
from integrations.config import get_settings
from integrations.config.schema import RequiredSecret, check_url
from integrations.errors import PermanentError, TransientError
from integrations.services.base import Attempt, Operation, Outcome, Service
from integrations.services.s3client import classify, client_for
from integrations.services.s3ops import S3Operation, catalog

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

#: https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Service(Service):
    kind: Literal["s3"] = "s3"
    health_own_check: ClassVar[bool] = True

    #: The one bucket this service reads and writes: an agent names keys, never buckets.
    bucket: str
    region: str = Field("us-east-1", pattern=r"^[a-z0-9-]{2,32}$")
    #: An S3-compatible store (MinIO, R2, Ceph); AWS when left out.
    endpoint_url: str | None = None
    #: ``path`` (``host/bucket/key``) or ``virtual`` (``bucket.host/key``); default: path with
    #: an ``endpoint_url``, else boto3's choice.
    addressing_style: Literal["auto", "path", "virtual"] | None = None
    access_key_id: RequiredSecret
    secret_access_key: RequiredSecret
    session_token: RequiredSecret | None = None
    #: The most ``get_object`` returns of one object.
    max_object_bytes: int = Field(10 * 1024 * 1024, ge=1, le=100 * 1024 * 1024)
    allow_private_network: bool = False
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    #: A CA bundle to trust instead of the system's (a store behind a private CA).
    ca_bundle: Path | None = None

    _ops: dict[str, S3Operation] | None = PrivateAttr(default=None)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not _BUCKET.match(v) or ".." in v:
            raise ValueError("not a valid bucket name (3-63 lower-case letters, digits, '.' and '-')")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v, what="endpoint_url", path_allowed=False).rstrip("/")

    # ---- the contract ------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, S3Operation]:
        if self._ops is None:
            self._ops = catalog(self.max_object_bytes)
        return self._ops

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        assert isinstance(op, S3Operation)
        return self._attempt(op.action, lambda c: getattr(self, "_" + op.action)(c, params))

    def check_health(self) -> Outcome:
        """HeadBucket: the bucket exists and these credentials may use it (unless ``health``
        names an operation)."""
        if self.health is not None and self.health.operation is not None:
            return super().check_health()
        return self._attempt(
            "head_bucket", lambda c: ({"bucket": self.bucket}, c.head_bucket(Bucket=self.bucket))
        )

    def describe(self) -> str:
        where = self.endpoint_url or f"AWS {self.region}"
        return f"s3, bucket {self.bucket} at {where}"

    # ---- one attempt -------------------------------------------------------------------------

    def _attempt(self, action: str, do: Callable[[S3Client], tuple[dict[str, Any], Any]]) -> Outcome:
        t0 = time.perf_counter()
        try:
            data, resp = do(client_for(self))
        except Exception as e:
            err = classify(e, action, self.secret_values(), self.retry.retry_after_max)
            if err is None:
                raise
            err.latency_ms = (time.perf_counter() - t0) * 1000
            err.excerpt = self._bounded(err.excerpt)
            raise err from None
        meta = resp.get("ResponseMetadata", {}) if isinstance(resp, dict) else {}
        shown = {**data, "content": f"<{len(data['content'])} characters>"} if "content" in data else data
        return Outcome(
            data=data,
            status_code=meta.get("HTTPStatusCode"),
            latency_ms=(time.perf_counter() - t0) * 1000,
            # Neither object content nor a working presigned URL goes to the ledger.
            excerpt=self._bounded(redact.redact(json.dumps(shown, ensure_ascii=False))),
            meta={k: v for k, v in (("request_id", meta.get("RequestId")),) if v},
        )

    def _bounded(self, text: str | None) -> str | None:
        if not text:
            return None
        scrubbed = redact.scrub(text.encode(), self.secret_values())
        return scrubbed[: get_settings().ledger_body_max_bytes].decode(errors="ignore") or None

    # ---- the operations: (data, boto3's response) --------------------------------------------

    def _put_object(self, c: S3Client, p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        binary = p.get("encoding", "text") == "base64"
        body = base64.b64decode(p["content"]) if binary else p["content"].encode()
        default_type = "application/octet-stream" if binary else "text/plain; charset=utf-8"
        resp = c.put_object(
            Bucket=self.bucket,
            Key=p["key"],
            Body=body,
            ContentType=p.get("content_type", default_type),
            Metadata=p.get("metadata", {}),
        )
        data = {"key": p["key"], "size": len(body), "etag": _etag(resp.get("ETag"))}
        return _with(data, version_id=resp.get("VersionId")), resp

    def _get_object(self, c: S3Client, p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        limit = p.get("max_bytes", self.max_object_bytes)
        resp = c.get_object(Bucket=self.bucket, Key=p["key"])
        body = _read(resp["Body"], limit + 1, resp.get("ContentLength"))
        truncated, body = len(body) > limit, body[:limit]
        encoding = p.get("encoding", "auto")
        if encoding != "base64":
            try:
                content = body.decode("utf-8")
                encoding = "text"
            except UnicodeDecodeError:
                if encoding == "text" and not truncated:
                    raise PermanentError("the object is not UTF-8 text; ask for encoding base64") from None
                encoding = "base64"  # (a cut may split a character: base64 keeps every byte)
        if encoding == "base64":
            content = base64.b64encode(body).decode()
        data = {**self._described(p["key"], resp), "content": content, "encoding": encoding}
        return {**data, "truncated": truncated}, resp

    def _list_objects(self, c: S3Client, p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": p.get("prefix", "")}
        args["MaxKeys"] = p.get("max_keys", 1000)
        if "delimiter" in p:
            args["Delimiter"] = p["delimiter"]
        if "continuation_token" in p:
            args["ContinuationToken"] = p["continuation_token"]
        resp = c.list_objects_v2(**args)
        objects = [
            {
                "key": o["Key"],
                "size": o["Size"],
                "etag": _etag(o.get("ETag")),
                "last_modified": _iso(o.get("LastModified")),
            }
            for o in resp.get("Contents", [])
        ]
        data = {
            "objects": objects,
            "prefixes": [cp["Prefix"] for cp in resp.get("CommonPrefixes", [])],
            "truncated": bool(resp.get("IsTruncated")),
            "next_token": resp.get("NextContinuationToken"),
        }
        return data, resp

    def _head_object(self, c: S3Client, p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        resp = c.head_object(Bucket=self.bucket, Key=p["key"])
        return self._described(p["key"], resp), resp

    def _delete_object(self, c: S3Client, p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        resp = c.delete_object(Bucket=self.bucket, Key=p["key"])
        return {"key": p["key"], "deleted": True}, resp

    def _presign(self, c: S3Client, p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        method, expires = p.get("method", "get"), p.get("expires_in", 3600)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": p["key"]}
        headers: dict[str, str] = {}
        if method == "put" and "content_type" in p:
            args["ContentType"] = headers["Content-Type"] = p["content_type"]
        # Signed here, with no request: the URL works for whoever holds it until it expires.
        url = c.generate_presigned_url(f"{method}_object", Params=args, ExpiresIn=expires)
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires)
        data = {"url": url, "method": method.upper(), "expires_at": until.isoformat(timespec="seconds")}
        return {**data, "headers": headers}, None

    def _described(self, key: str, resp: Any) -> dict[str, Any]:
        data = {
            "key": key,
            "size": resp.get("ContentLength"),
            "content_type": resp.get("ContentType"),
            "etag": _etag(resp.get("ETag")),
            "last_modified": _iso(resp.get("LastModified")),
            "metadata": resp.get("Metadata", {}),
        }
        return _with(data, version_id=resp.get("VersionId"))


def _read(stream: Any, most: int, length: int | None) -> bytes:
    """At most ``most`` bytes of a body whose ``Content-Length`` is ``length``. A body that ends
    short of both was cut off (botocore checks the length only when a read reaches the end)."""
    chunks: list[bytes] = []
    got = 0
    try:
        while got < most:
            chunk = stream.read(min(most - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        stream.close()  # an unread rest is dropped with its connection
    if length is not None and got < min(most, length):
        raise TransientError(f"S3 get_object: the connection dropped mid-answer ({got} of {length} bytes)")
    return b"".join(chunks)


def _etag(v: str | None) -> str | None:
    return v.strip('"') if v else None


def _iso(v: dt.datetime | None) -> str | None:
    return v.isoformat() if v else None


def _with(data: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {**data, **{k: v for k, v in optional.items() if v is not None}}
