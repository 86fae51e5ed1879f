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

Group commit: deliveries that arrive while a write is in flight are stored together by the
next one, in one INSERT and one commit, and queued in one message (``publish_many``). A lone
delivery is written at once (no timer, no added wait); under a burst the commit, the durable
and slow part, is shared. Every answer still waits for the commit that holds its delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
PublishMany = Callable[[list[str]], None]

#: At most this many deliveries share one write (and one message to the workers).
BATCH_MAX = 200


def _answer(code: int, **body: object) -> JSONResponse:
    return JSONResponse(body, status_code=code)


def create_app(
    sources: dict[str, WebhookSource],
    publish: Publish,
    max_body: int,
    clock: Callable[[], float] = time.time,
    publish_many: PublishMany | None = None,
) -> FastAPI:
    """The receiver for ``sources``; ``publish(event_id)`` queues a stored event for dispatch,
    ``publish_many(event_ids)`` (when given) the events of one write at once."""
    app = FastAPI(
        title="agent-integrations webhook receiver", docs_url=None, redoc_url=None, openapi_url=None
    )
    queue = publish_many or _each(publish)
    writes = _GroupCommit(lambda batch: _store_and_queue(batch, queue))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def receive(request: Request) -> JSONResponse:
        source: str = request.path_params["source"]
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
        return await writes.submit(_Received(source, delivery, accepted))

    # A plain Starlette route: FastAPI's dependency solving (query string, cookies, parameters)
    # was a quarter of the app's time per request, for nothing this route uses.
    app.add_route("/webhooks/{source}", receive, methods=["POST"])
    return app


@dataclass(frozen=True)
class _Received:
    """A verified delivery waiting to be stored, and the code that accepts it."""

    source: str
    delivery: Delivery
    accepted: int


class _GroupCommit:
    """One write in flight at a time per process: it stores every delivery that arrived while
    the previous one ran (up to :data:`BATCH_MAX`) in one commit, then queues their events in
    one message; the answers go then.

    One write at a time makes the largest batches, so the least work per delivery. Measured
    against it: two writes in flight cost 15% more CPU per request, and so did queuing a
    write's events while the next write stored (pipelining), for no steady gain in answers."""

    def __init__(self, write: Callable[[list[_Received]], list[JSONResponse]]) -> None:
        self._write = write
        self._waiting: list[tuple[_Received, asyncio.Future[JSONResponse]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: _Received) -> JSONResponse:
        """The answer to ``item``, once it is stored and its event queued (or either failed)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[JSONResponse] = loop.create_future()
        self._waiting.append((item, answer))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:BATCH_MAX], self._waiting[BATCH_MAX:]
            try:
                answers = await run_in_threadpool(self._write, [item for item, _ in batch])
            except BaseException:  # cancelled (the server stopping): nobody waits any more
                for _, answer in batch:
                    answer.cancel()
                raise
            for (_, answer), response in zip(batch, answers, strict=True):
                if not answer.done():  # its client went away: stored and queued all the same
                    answer.set_result(response)


def _each(publish: Publish) -> PublishMany:
    def queue(event_ids: list[str]) -> None:
        for event_id in event_ids:
            publish(event_id)

    return queue


def _store(batch: list[_Received]) -> tuple[list[JSONResponse], list[str]]:
    """Store ``batch`` in one write: an answer for each, in order, and the ids of the events
    new to the ledger (to queue)."""
    new = [
        ledger.NewEvent(i.source, i.delivery.delivery_id, i.delivery.event_type, i.delivery.payload)
        for i in batch
    ]
    sources = ", ".join(sorted({i.source for i in batch}))
    try:
        event_ids = ledger.store_events(new)
    except SQLAlchemyError as e:
        log.error("%d webhooks for %s not stored: %s", len(batch), sources, type(e).__name__)
        if unreachable(e):
            return [_answer(503, error="the ledger is unavailable; retry later") for _ in batch], []
        if len(batch) > 1:  # refused for what one of them holds: each on its own, only it refused
            each = [_store([item]) for item in batch]
            return [a for answers, _ in each for a in answers], [i for _, ids in each for i in ids]
        return [_answer(400, error="the event could not be stored as sent")], []  # retrying would not help
    except Exception as e:  # a bug of ours: 500, the senders retry, the log says why
        log.error("%d webhooks for %s not stored: %s", len(batch), sources, type(e).__name__, exc_info=True)
        return [_answer(500, error="the event could not be stored") for _ in batch], []
    answers = [
        _answer(200, status="duplicate")
        if event_id is None
        else _answer(item.accepted, status="accepted", event_id=event_id)
        for item, event_id in zip(batch, event_ids, strict=True)
    ]
    return answers, [event_id for event_id in event_ids if event_id is not None]


def _store_and_queue(batch: list[_Received], queue: PublishMany) -> list[JSONResponse]:
    """:func:`_store` the batch, then queue its new events; an answer for each, in order."""
    answers, stored = _store(batch)
    if stored:
        try:
            queue(stored)
        except Exception as e:
            # Stored, so accepted: beat's sweeper dispatches events never dispatched. (Removing the
            # rows instead would race with a redelivery answered "duplicate" meanwhile.)
            log.error(
                "%d webhooks stored but not queued (%s); the sweeper will", len(stored), type(e).__name__
            )
    return answers
