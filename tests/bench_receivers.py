"""Reference webhook receivers for `make bench`, served by uvicorn like ours.

``bare`` answers 202 without looking at the request: the HTTP stack's ceiling. ``naive`` is
what one would write inline: check the GitHub signature, insert the event with a SQLAlchemy
session, queue a task with the payload (no dedupe, no size limit, no typed refusals).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from bench_tasks import NaiveCall, engine, noop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

SECRET = os.environ["BENCH_WEBHOOK_SECRET"].encode()

bare = FastAPI()
naive = FastAPI()


@bare.post("/webhooks/{source}")
async def accept(source: str) -> JSONResponse:
    return JSONResponse({"status": "accepted"}, status_code=202)


def _store(body: bytes) -> None:
    with Session(engine) as session:
        session.add(NaiveCall(status=202, body=body[:512].decode()))
        session.commit()
    noop.delay()


@naive.post("/webhooks/{source}")
async def receive(source: str, request: Request) -> JSONResponse:
    body = await request.body()
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, request.headers.get("x-hub-signature-256", "")):
        return JSONResponse({"error": "bad signature"}, status_code=401)
    await run_in_threadpool(_store, body)
    return JSONResponse({"status": "accepted"}, status_code=202)
