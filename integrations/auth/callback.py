"""``GET /oauth/callback`` on the receiver: where providers send the user back after an
authorization (:func:`integrations.auth.authorize.complete` does the work). It answers a small
HTML page that says whether the connection is authorized, and why not.

====================  ==============================================================
200                   tokens stored: the connection is active
400                   no state, an unknown / used / expired one, the user said no, or
                      the provider refused the code (nothing changed but the state used)
502                   the token endpoint could not be reached (the state is used: start again)
503                   the ledger is down
====================  ==============================================================
"""

from __future__ import annotations

import html
import logging

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from integrations.auth.authorize import Result, complete

log = logging.getLogger(__name__)

PATH = "/oauth/callback"


def page(result: Result) -> str:
    """The page the user sees: one heading, one line, nothing from the request but escaped text."""
    title = "Connected" if result.ok else "Not connected"
    who = ""
    if result.service and result.connection:
        name, service = html.escape(result.connection), html.escape(result.service)
        who = f"<p>Connection <b>{name}</b> of <b>{service}</b></p>"
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{title}</title></head><body><h1>{title}</h1>{who}"
        f"<p>{html.escape(result.message)}</p></body></html>"
    )


def add_callback(app: FastAPI) -> None:
    """Serve ``GET /oauth/callback`` on ``app`` (the webhook receiver)."""

    @app.get(PATH, response_class=HTMLResponse)
    async def oauth_callback(request: Request) -> HTMLResponse:
        q = request.query_params
        if any(len(q.getlist(name)) > 1 for name in ("state", "code", "error")):
            result = Result(400, False, "A parameter is repeated; start again.")
        else:
            try:
                result = await run_in_threadpool(complete, q.get("state"), q.get("code"), q.get("error"))
            except Exception as e:  # the ledger is down, say: the user may try again
                log.error("oauth callback failed: %s", type(e).__name__)
                result = Result(503, False, "The service is unavailable; try again in a moment.")
        if result.service:
            log.info(
                "oauth callback for connection %s of %s: %s", result.connection, result.service, result.status
            )
        headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        return HTMLResponse(page(result), status_code=result.status, headers=headers)
