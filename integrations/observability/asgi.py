"""The receiver observed: ``GET /metrics``, and each ``POST /webhooks/{source}`` counted by source
and answer in a ``webhook.receive`` span.

A pure ASGI middleware, so the receiver's own code (:mod:`integrations.webhooks.receiver`) stays
as it is, and a request costs one counter and, when tracing, one span.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from integrations.observability import metrics, metrics_exporter, traces

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PREFIX = "/webhooks/"


class ObservedReceiver:
    """Wraps the receiver's ASGI app. ``sources``: the configured source names (any other path
    is counted as ``unknown``, so a scanner cannot grow the label set)."""

    def __init__(self, app: ASGIApp, sources: Collection[str], serve_metrics: bool = True) -> None:
        self.app = app
        self.sources = frozenset(sources)
        self.serve_metrics = serve_metrics
        self._registry: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.serve_metrics and path == "/metrics" and scope["method"] in ("GET", "HEAD"):
            if self._registry is None:
                self._registry = metrics_exporter.receiver_registry()
            await _metrics(send, self._registry)
            return
        if not path.startswith(_PREFIX):
            await self.app(scope, receive, send)
            return
        source = path[len(_PREFIX) :]
        label = source if source in self.sources else "unknown"
        code = 500  # what the sender sees when the app fails before answering

        async def answered(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
            await send(message)

        with traces.span("webhook.receive", **{"webhook.source": label}):
            try:
                await self.app(scope, receive, answered)
            finally:
                metrics.webhook_received(label, code)
                traces.annotate(**{"http.response.status_code": code})


async def _metrics(send: Send, registry: Any) -> None:
    body, content_type = metrics_exporter.render(registry)
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
