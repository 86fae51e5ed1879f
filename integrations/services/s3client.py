"""The ``s3`` kind's side of boto3: one client per service and process (boto3's retries off,
every connection through the SSRF guard) and the one place where S3's errors become ours."""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING, Any

import boto3
from botocore.awsrequest import AWSHTTPConnectionPool, AWSHTTPSConnectionPool
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import HTTPError as Urllib3Error

from integrations import redact, ssrf
from integrations.errors import CallError, ConfigError, PermanentError, RateLimited, TransientError
from integrations.http import parse_retry_after

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from integrations.services.s3 import S3Service
else:
    S3Client = Any

#: Error codes that ask us to slow down (botocore's own list: botocore/retries/standard.py).
THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException",
}
TRANSIENT = {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"}
#: A HEAD has no body, so no error code: its status stands in.
_HEAD_CODES = {"400": "BadRequest", "403": "AccessDenied", "404": "NoSuchKey", "412": "PreconditionFailed"}
MESSAGE_MAX = 300

# ---- clients ---------------------------------------------------------------------------------

_lock = threading.Lock()
_clients: dict[str, S3Client] = {}


def client_for(svc: S3Service) -> S3Client:
    """The boto3 client of ``svc`` in this process (thread-safe once made), made on first use."""
    client = _clients.get(svc.name)
    if client is None:
        with _lock:
            client = _clients.get(svc.name)
            if client is None:
                client = _clients[svc.name] = make_client(svc)
    return client


def _forget_clients_in_child() -> None:
    global _clients, _lock
    _clients, _lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_in_child)


def make_client(svc: S3Service) -> S3Client:
    style = svc.addressing_style or ("path" if svc.endpoint_url else "auto")
    config = Config(
        region_name=svc.region,
        signature_version="s3v4",
        # One attempt: Celery retries the job, with the service's backoff. (``max_attempts``
        # counts retries, so 1 would be two attempts: botocore/config.py.)
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=min(svc.timeout, 10),
        read_timeout=svc.timeout,
        s3={"addressing_style": style},
        # Checksums only where the API requires them: S3-compatible stores differ on the rest.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="agent-integrations",
    )
    session_token = svc.session_token.get() if svc.session_token else None
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=svc.endpoint_url,
        aws_access_key_id=svc.access_key_id.get(),
        aws_secret_access_key=svc.secret_access_key.get(),
        aws_session_token=session_token,
        config=config,
        verify=str(svc.ca_bundle) if svc.ca_bundle else None,
    )
    if not svc.allow_private_network:
        # botocore has no public hook for its connection classes: its pool classes are swapped
        # for guarded ones (tests/test_s3.py proves the guard holds).
        http = client._endpoint.http_session  # type: ignore[attr-defined]
        guarded = ssrf.pool_classes(svc.allowed_networks, AWSHTTPConnectionPool, AWSHTTPSConnectionPool)
        http._pool_classes_by_scheme = guarded
        http._manager.pool_classes_by_scheme = guarded
    return client


# ---- errors ----------------------------------------------------------------------------------


def classify(e: BaseException, action: str, secrets: list[str], retry_after_max: float) -> CallError | None:
    """The error ``e`` stands for, or ``None`` when it is not the store's (a bug: re-raise).

    Throttling codes (``SlowDown``...), 429 and 503 are :class:`RateLimited`; other 5xx,
    ``InternalError``, ``RequestTimeout`` and connection errors transient; the rest (``NoSuchKey``,
    ``NoSuchBucket``, ``AccessDenied``, ``InvalidAccessKeyId``...) permanent, named in the message.
    """
    if isinstance(e, CallError):
        return e
    if isinstance(e, ConfigError):  # a credential this process does not have
        return PermanentError(str(e))
    if isinstance(e, ClientError):
        return _from_response(e.response, action, secrets, retry_after_max)
    if isinstance(e, ResponseStreamingError | IncompleteReadError | Urllib3Error):
        return TransientError(f"S3 {action}: the connection dropped mid-answer ({type(e).__name__})")
    if isinstance(e, HTTPClientError | BotoConnectionError):
        cause = e.kwargs.get("error")
        if isinstance(cause, CallError):  # BlockedAddress, from the guarded connection
            return cause
        return TransientError(f"S3 {action}: connection failed ({type(e).__name__})")
    if isinstance(e, BotoCoreError):
        return PermanentError(f"S3 {action}: {type(e).__name__}")
    return None


def _from_response(resp: Any, action: str, secrets: list[str], retry_after_max: float) -> CallError:
    error = resp.get("Error", {})
    meta = resp.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    code = str(error.get("Code") or status or "")
    if code.isdigit():
        code = "NoSuchBucket" if action == "head_bucket" and code == "404" else _HEAD_CODES.get(code, code)
    text = str(error.get("Message") or "").strip().splitlines()[0:1]
    message = redact.scrub(" ".join(text).encode(), secrets).decode(errors="replace")[:MESSAGE_MAX]
    what = redact.redact(f"{code}: {message}" if message else code)
    excerpt = json.dumps({k: v for k, v in error.items() if isinstance(v, str)}, ensure_ascii=False)
    err: CallError
    if code in THROTTLED or status in (429, 503):
        retry_after = parse_retry_after((meta.get("HTTPHeaders") or {}).get("retry-after"))
        if retry_after is not None:
            retry_after = min(retry_after, retry_after_max)
        err = RateLimited(what, retry_after=retry_after, status_code=status)
    elif code in TRANSIENT or (status or 0) >= 500:
        err = TransientError(what, status_code=status)
    else:
        err = PermanentError(what, status_code=status)
    err.excerpt = excerpt
    err.meta["code"] = code
    return err
