"""The webhook receiver as the app runs it: the library's ASGI app, publishing to the workers.

``integrations receiver`` (and ``make run``) serves it with uvicorn on
``RECEIVER_HOST:RECEIVER_PORT``, in ``RECEIVER_WORKERS`` processes;
``uvicorn --factory tasks.receiver:app_from_settings`` too.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from integrations import redact
from integrations.config import get_settings, get_webhooks
from integrations.webhooks.receiver import create_app
from tasks.events import publish_event, publish_events

log = logging.getLogger("integrations.webhooks.receiver")


def app_from_settings() -> FastAPI:
    """The receiver as the settings and the services file describe it."""
    return create_app(
        get_webhooks(), publish_event, get_settings().webhook_max_body_bytes, publish_many=publish_events
    )


def serve() -> None:
    import uvicorn

    redact.install()
    s = get_settings()
    sources = get_webhooks()
    for src in sources.values():
        _ = src.secrets  # a secret not set here stops the receiver now, in one line naming it
    if sources:
        log.warning("receiving webhooks at /webhooks/{%s}", ",".join(sorted(sources)))
    else:
        log.warning("no webhook sources: add a webhooks: section to %s", s.services_file)
    # Several workers: processes sharing the port, each building the app from the settings.
    uvicorn.run(
        app_from_settings() if s.receiver_workers == 1 else "tasks.receiver:app_from_settings",
        factory=s.receiver_workers > 1,
        workers=s.receiver_workers,
        host=s.receiver_host,
        port=s.receiver_port,
        log_level=s.log_level.lower(),
        access_log=False,
    )
