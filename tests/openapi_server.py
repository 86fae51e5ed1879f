"""A loopback server made from an OpenAPI document: it checks every request against the
document with openapi-core's request validation, records the verdict, and answers 200 with what
it received (or 400 with the validation errors)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
from werkzeug.wrappers import Request, Response


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    errors: list[str] = field(default_factory=list)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class SpecServer:
    """``SpecServer(document).start()``; ``url`` is where the document's server now is."""

    def __init__(self, document: dict[str, Any], prefix: str = "") -> None:
        self.server: WSGIServer = make_server("127.0.0.1", 0, self._app, handler_class=_Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}{prefix}"
        self.openapi = OpenAPI.from_dict({**document, "servers": [{"url": self.url}]})
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def start(self) -> SpecServer:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data(cache=True)
        seen = Seen(
            request.method,
            request.path,
            {k: request.args.getlist(k) for k in request.args},
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        try:
            self.openapi.validate_request(WerkzeugOpenAPIRequest(request))
        except Exception as e:
            causes = [
                str(c) for c in getattr(e, "schema_errors", None) or [getattr(e, "__cause__", None)] if c
            ]
            seen.errors = [f"{type(e).__name__}: {e}", *causes]
        with self.lock:
            self.seen.append(seen)
        status = 400 if seen.errors else 200
        payload = (
            {"errors": seen.errors}
            if seen.errors
            else {"method": seen.method, "path": seen.path, "query": seen.query}
        )
        return Response(json.dumps(payload), status=status, content_type="application/json")(
            environ, start_response
        )
