"""A real HTTP server on loopback standing in for upstream APIs, for tests and the benchmark.

``/echo/{key}`` answers what a test programmed for ``key`` (a queue of :class:`Reply`), then
200 with a JSON echo of the request. Every request is recorded with its arrival time.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    reason: str | None = None  # the status line's reason phrase, when not the standard one


@dataclass
class Hit:
    at: float
    method: str
    path: str
    key: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client_port: int
    #: When the reply had been written (or the connection dropped): 0 while still being answered.
    done: float = 0.0


class Stub(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.lock = threading.Lock()
        self.plans: dict[str, deque[Reply]] = defaultdict(deque)
        self.hits: list[Hit] = []
        self.record = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def plan(self, key: str, *replies: Reply) -> None:
        with self.lock:
            self.plans[key].extend(replies)

    def hits_for(self, key: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.key == key]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or hang up are part of the tests

    def start(self) -> Stub:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class TlsStub(Stub):
    """The same server over HTTPS, with ``cert`` and ``key`` (see tests/private_ca.py). The TLS
    handshake runs in the request's own thread, so a client that refuses the certificate
    holds nothing up; such a connection records no request."""

    def __init__(self, cert: Path, key: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def setup(self) -> None:
        super().setup()
        # Answer in one segment, like a real server: without this, Nagle's algorithm holds the
        # body back until the client's delayed ACK (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        segments = parts.path.strip("/").split("/")
        key = segments[1] if len(segments) > 1 else ""
        srv = self.server
        hit: Hit | None = None
        with srv.lock:
            if srv.record:
                hit = Hit(
                    time.time(),
                    self.command,
                    parts.path,
                    key,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    self.client_address[1],
                )
                srv.hits.append(hit)
            plan = srv.plans.get(key)
            reply = plan.popleft() if plan else Reply()
        try:
            self._reply(reply, parts.path, parts.query, body)
        finally:
            if hit is not None:
                with srv.lock:
                    hit.done = time.time()

    def _reply(self, reply: Reply, path: str, query: str, body: bytes) -> None:
        if reply.delay:
            time.sleep(reply.delay)
        if reply.drop:
            self.close_connection = True
            return
        payload = reply.body
        if payload is None:
            payload = {
                "method": self.command,
                "path": path,
                "query": parse_qs(query),
                "json": _json_or_none(body),
            }
            if body and payload["json"] is None:  # a form body, say: echoed as text
                payload["text"] = body.decode("utf-8", errors="replace")
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(reply.status, reply.reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None
