"""The webhook receiver: an ASGI app that verifies, stores and queues incoming webhooks.

``POST /webhooks/{source}`` for each source of the services file's ``webhooks:`` section.
A verified delivery is stored once (per the sender's delivery id) and its id queued for the
workers; the answer does not wait for the handlers. A refused request stores and queues
nothing, and its answer names the problem, never a secret.

====================  =======================================================
202 ``accepted``      stored and queued (200 for Slack, which asks for it)
200 ``duplicate``     this delivery id was stored before; not handled again
200 challenge         Slack's ``url_verification``, answered
400 / 401             malformed body / bad signature or timestamp
404                   no such source
413                   body over ``WEBHOOK_MAX_BODY_BYTES``
503                   the ledger is down: the sender should retry
====================  =======================================================

With the broker down, a stored event is still accepted: beat's ``requeue_stuck_events``
dispatches it once the broker is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from integrations.config import WebhookSource
from integrations.errors import ConfigError, WebhookRefused
from integrations.ledger import events as ledger
from integrations.ledger.db import unreachable
from integrations.webhooks.verify import Delivery, verify

log = logging.getLogger(__name__)

Publish = Callable[[str], None]


def _answer(code: int, **body: object) -> JSONResponse:
    return JSONResponse(body, status_code=code)


def create_app(
    sources: dict[str, WebhookSource],
    publish: Publish,
    max_body: int,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The receiver for ``sources``; ``publish(event_id)`` queues a stored event for dispatch."""
    app = FastAPI(
        title="agent-integrations webhook receiver", docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/{source}")
    async def receive(source: str, request: Request) -> JSONResponse:
        src = sources.get(source)
        if src is None:
            return _answer(404, error=f"no webhook source named {source!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return _answer(413, error=f"body is larger than {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return _answer(413, error=f"body is larger than {max_body} bytes")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            delivery = verify(src, headers, bytes(body), clock())
        except WebhookRefused as e:
            log.info("webhook for %s refused: %s", source, e)
            return _answer(e.status, error=str(e))
        except ConfigError:  # its secret is not set in the receiver's environment
            log.error("webhook for %s not verified: its secret is not configured here", source)
            return _answer(503, error="this source's secret is not configured; retry later")
        if delivery.reply is not None:
            return JSONResponse(delivery.reply)
        # Slack asks for 200 (https://api.slack.com/apis/events-api#responding); others get 202.
        accepted = 200 if src.type == "slack" else 202
        return await run_in_threadpool(_store_and_queue, source, delivery, publish, accepted)

    return app


def _store_and_queue(source: str, delivery: Delivery, publish: Publish, accepted: int) -> JSONResponse:
    try:
        event_id = ledger.store_event(source, delivery.delivery_id, delivery.event_type, delivery.payload)
    except SQLAlchemyError as e:
        if not unreachable(e):  # refused for what it holds: retrying would not help
            log.error("webhook for %s not stored: %s", source, type(e).__name__)
            return _answer(400, error="the event could not be stored as sent")
        log.error("webhook for %s not stored: %s", source, type(e).__name__)
        return _answer(503, error="the ledger is unavailable; retry later")
    except Exception as e:  # a bug of ours: 500, the sender retries, the log says why
        log.error("webhook for %s not stored: %s", source, type(e).__name__, exc_info=True)
        return _answer(500, error="the event could not be stored")
    if event_id is None:
        return _answer(200, status="duplicate")
    try:
        publish(event_id)
    except Exception as e:
        # Stored, so accepted: beat's sweeper dispatches events never dispatched. (Removing the
        # row instead would race with a redelivery answered "duplicate" meanwhile.)
        log.error("webhook for %s stored but not queued (%s); the sweeper will", source, type(e).__name__)
    return _answer(accepted, status="accepted", event_id=event_id)
