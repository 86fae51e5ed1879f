"""The s3 kind through the job path, against moto's standalone S3 server on loopback.

``files`` talks to moto directly; ``files_throttled`` through a proxy that answers SlowDown
when a test asks it to; ``files_cut`` through a TcpProxy that drops an answer midway.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from conftest import S3_SECRET_ACCESS_KEY
from jsonschema import Draft202012Validator
from moto.server import ThreadedMotoServer
from procs import cli
from tcp_proxy import TcpProxy

from integrations import health
from integrations.errors import InvalidParams, PermanentError
from integrations.ledger import reads
from integrations.services import get_services
from tasks import call_service

pytestmark = pytest.mark.usefixtures("worker", "moto")

BUCKET = "agent-files"
MOTO = ("127.0.0.1", int(os.environ["S3_PORT"]))


def run(service: str, operation: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = call_service.delay(service, operation, params).get(timeout=40)
    return out


def job_of(job_id: str) -> dict[str, Any]:
    job = reads.get_job(job_id, with_attempts=True)
    assert job is not None
    return job


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    """moto's S3 server on the port the services file names, with the bucket made."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=MOTO[0], port=MOTO[1], verbose=False)
    server.start()
    admin = boto3.client(
        "s3",
        endpoint_url=f"http://{MOTO[0]}:{MOTO[1]}",
        region_name="us-east-1",
        aws_access_key_id="admin",
        aws_secret_access_key="admin-secret",
    )
    admin.create_bucket(Bucket=BUCKET)
    yield admin
    server.stop()


@pytest.fixture
def key() -> str:
    return f"t/{uuid.uuid4().hex}"


# ---- operations -----------------------------------------------------------------------------


def test_a_binary_object_round_trips_with_its_type_and_metadata(key: str) -> None:
    payload = bytes(range(256)) * 300 + os.urandom(1000)
    put = run(
        "files",
        "put_object",
        key=key,
        content=base64.b64encode(payload).decode(),
        encoding="base64",
        content_type="application/x-test",
        metadata={"source": "agent-7"},
    )
    assert put["status_code"] == 200
    assert put["data"] == {"key": key, "size": len(payload), "etag": hashlib.md5(payload).hexdigest()}  # noqa: S324

    got = run("files", "get_object", key=key)
    assert got["data"]["encoding"] == "base64"  # not UTF-8, so base64 whatever was asked
    assert base64.b64decode(got["data"]["content"]) == payload
    assert got["data"]["truncated"] is False
    assert (got["data"]["content_type"], got["data"]["metadata"]) == (
        "application/x-test",
        {"source": "agent-7"},
    )
    # The ledger keeps what was read, never the content.
    assert got["data"]["content"][:100] not in (job_of(got["job_id"])["response_excerpt"] or "")

    head = run("files", "head_object", key=key)["data"]
    assert (head["size"], head["etag"]) == (len(payload), put["data"]["etag"])


def test_text_in_text_out_and_a_bounded_read(key: str) -> None:
    run("files", "put_object", key=key, content="héllo wörld")
    got = run("files", "get_object", key=key)["data"]
    assert (got["content"], got["encoding"], got["content_type"]) == (
        "héllo wörld",
        "text",
        "text/plain; charset=utf-8",
    )
    cut = run("files", "get_object", key=key, max_bytes=5)["data"]
    assert (cut["content"], cut["truncated"], cut["size"]) == ("héll", True, 13)
    with pytest.raises(InvalidParams, match="max_bytes: fails maximum"):
        call_service.delay("files", "get_object", {"key": key, "max_bytes": 2 * 1024 * 1024})


def test_listing_2500_keys_takes_three_pages(moto: Any) -> None:
    prefix = f"page-{uuid.uuid4().hex[:8]}/"
    keys = [f"{prefix}{i:04d}" for i in range(2500)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: moto.put_object(Bucket=BUCKET, Key=k, Body=b"x"), keys))
    seen: list[str] = []
    pages, token = 0, None
    while pages < 5:
        params = {"prefix": prefix, **({"continuation_token": token} if token else {})}
        page = run("files", "list_objects", **params)["data"]
        seen += [o["key"] for o in page["objects"]]
        pages += 1
        token = page["next_token"]
        if not page["truncated"]:
            break
    assert pages == 3 and token is None
    assert seen == keys  # every key once, in order
    grouped = run("files", "list_objects", prefix="", delimiter="/", max_keys=1000)["data"]
    assert prefix in grouped["prefixes"]


def test_presigned_urls_work_with_plain_requests(key: str) -> None:
    payload = os.urandom(2048)
    put = run("files", "presign", key=key, method="put", content_type="image/png", expires_in=600)["data"]
    assert put["method"] == "PUT" and "X-Amz-Expires=600" in put["url"]
    assert requests.put(put["url"], data=payload, headers=put["headers"], timeout=10).status_code == 200

    got = run("files", "get_object", key=key, encoding="base64")["data"]
    assert base64.b64decode(got["content"]) == payload and got["content_type"] == "image/png"

    out = run("files", "presign", key=key)
    download = requests.get(out["data"]["url"], timeout=10)
    assert download.status_code == 200 and download.content == payload
    # The ledger does not keep a URL that works.
    signature = parse_qs(urlsplit(out["data"]["url"]).query)["X-Amz-Signature"][0]
    assert signature not in json.dumps(job_of(out["job_id"]), default=str)
    with pytest.raises(InvalidParams, match="expires_in: fails maximum 604800"):
        call_service.delay("files", "presign", {"key": key, "expires_in": 7 * 24 * 3600 + 1})


def test_delete_then_no_such_key_fails_at_once(key: str) -> None:
    run("files", "put_object", key=key, content="bye")
    assert run("files", "delete_object", key=key)["data"] == {"key": key, "deleted": True}
    for operation in ("get_object", "head_object"):
        r = call_service.delay("files", operation, {"key": key})
        with pytest.raises(PermanentError, match=r"^NoSuchKey"):
            r.get(timeout=30)
        job = job_of(r.id)
        assert (job["attempts"], job["status_code"], job["meta"]) == (1, 404, {"code": "NoSuchKey"})


def test_a_missing_bucket_is_named_and_unhealthy() -> None:
    r = call_service.delay("files_missing", "put_object", {"key": "k", "content": "x"})
    with pytest.raises(PermanentError, match=r"^NoSuchBucket"):
        r.get(timeout=30)
    services = get_services()
    assert health.check(services["files"]).ok
    sick = health.check(services["files_missing"])
    assert not sick.ok and sick.status_code == 404 and (sick.error or "").startswith("NoSuchBucket")


def test_the_ssrf_guard_holds_for_botocores_connections(key: str) -> None:
    r = call_service.delay("files_guarded", "head_object", {"key": key})
    with pytest.raises(PermanentError, match="not a public address"):
        r.get(timeout=30)


# ---- retried failures -----------------------------------------------------------------------

# AWS's REST error document, with SlowDown's code, message and status (503 Slow Down) from its
# list of error codes: https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
SLOW_DOWN = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error>
  <Code>SlowDown</Code>
  <Message>Please reduce your request rate.</Message>
  <Resource>%s</Resource>
  <RequestId>4442587FB7D0A2F9</RequestId>
</Error>"""


class SlowDownProxy(ThreadingHTTPServer):
    """Forwards every request to moto, except that it answers ``503 SlowDown`` to the next
    ``times`` requests whose path holds a marker (:meth:`slow_down`)."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _ProxyHandler)
        self._lock = threading.Lock()
        self._plans: dict[str, int] = {}
        self.answered: list[tuple[str, int]] = []

    def slow_down(self, marker: str, times: int = 1) -> None:
        with self._lock:
            self._plans[marker] = times

    def take(self, path: str) -> bool:
        with self._lock:
            for marker, left in self._plans.items():
                if marker in path and left > 0:
                    self._plans[marker] = left - 1
                    return True
        return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SlowDownProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.take(self.path):
            answer = SLOW_DOWN % self.path.split("?")[0].encode()
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer if self.command != "HEAD" else b"")
            self.server.answered.append((self.path, 503))
            return
        upstream = http.client.HTTPConnection(*MOTO, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        resp = upstream.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        self.wfile.write(data if self.command != "HEAD" else b"")
        upstream.close()
        self.server.answered.append((self.path, resp.status))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


@pytest.fixture
def slow_down() -> Iterator[SlowDownProxy]:
    proxy = SlowDownProxy(int(os.environ["S3_THROTTLE_PORT"]))
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=5)


def test_slow_down_is_rate_limited_and_retried(slow_down: SlowDownProxy, key: str) -> None:
    slow_down.slow_down(key, times=1)
    out = run("files_throttled", "put_object", key=key, content="after a pause")
    log = job_of(out["job_id"])["attempts_log"]
    assert [(a["outcome"], a["status_code"]) for a in log] == [("retrying", 503), ("succeeded", 200)]
    assert log[0]["error"] == "SlowDown: Please reduce your request rate."
    assert [status for path, status in slow_down.answered if key in path] == [503, 200]
    assert run("files", "get_object", key=key)["data"]["content"] == "after a pause"


def test_an_answer_dropped_midway_is_retried(moto: Any, key: str) -> None:
    payload = os.urandom(600_000)
    moto.put_object(Bucket=BUCKET, Key=key, Body=payload)
    with TcpProxy(MOTO, port=int(os.environ["S3_CUT_PORT"])) as proxy:
        # The proxy reads at most 64 KiB at a time: the headers and some of the body get through.
        proxy.drop_after(200_000)
        out = run("files_cut", "get_object", key=key)
    assert base64.b64decode(out["data"]["content"]) == payload
    log = job_of(out["job_id"])["attempts_log"]
    assert [a["outcome"] for a in log] == ["retrying", "succeeded"]
    assert "dropped mid-answer" in log[0]["error"]


# ---- credentials ----------------------------------------------------------------------------


def test_the_secret_key_is_never_in_the_ledger_results_or_logs(
    caplog: pytest.LogCaptureFixture, slow_down: SlowDownProxy, key: str
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore logs what it signs at DEBUG
    slow_down.slow_down(key, times=1)
    results = [
        run("files_throttled", "put_object", key=key, content="secret-free"),
        run("files", "get_object", key=key),
        run("files", "presign", key=key),
    ]
    failed = call_service.delay("files", "head_object", {"key": key + "-missing"})
    with pytest.raises(PermanentError):
        failed.get(timeout=30)
    jobs = [job_of(r["job_id"]) for r in results] + [job_of(failed.id)]
    listing = cli("services")
    assert listing.returncode == 0 and "files (s3, bucket agent-files at http://127.0.0.1:" in listing.stdout
    assert "  presign: " in listing.stdout
    for where, text in [
        ("results", json.dumps(results)),
        ("ledger", json.dumps(jobs, default=str)),
        ("logs", caplog.text),
        ("integrations services", listing.stdout),
    ]:
        assert S3_SECRET_ACCESS_KEY not in text, where
    assert os.environ["S3_ACCESS_KEY_ID"] not in json.dumps(jobs, default=str)


def test_every_operation_has_a_complete_schema() -> None:
    ops = get_services()["files"].catalog()
    assert sorted(ops) == [
        "delete_object",
        "get_object",
        "head_object",
        "list_objects",
        "presign",
        "put_object",
    ]
    for name, op in ops.items():
        schema = op.parameters
        Draft202012Validator.check_schema(schema)
        assert schema["additionalProperties"] is False and schema["description"], name
        assert set(schema.get("required", [])) <= set(schema["properties"]), name
        for prop, spec in schema["properties"].items():
            assert spec.get("description"), f"{name}.{prop}"
    assert ops["presign"].parameters["properties"]["method"] == {
        "type": "string",
        "enum": ["get", "put"],
        "default": "get",
        "description": "get: download the object; put: upload it (with an HTTP PUT).",
    }
    with pytest.raises(InvalidParams, match="content: not valid base64"):
        ops["put_object"].validate_params({"key": "k", "content": "%%%", "encoding": "base64"})


def test_integrations_call_wait_reads_an_object(key: str) -> None:
    run("files", "put_object", key=key, content="from the command line")
    out = cli("call", "files", "get_object", f"key={key}", "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data"]["content"] == "from the command line"
