"""The webhook receiver as the app runs it: the library's ASGI app, publishing to the workers,
and the OAuth callback where end users' authorizations come back (``GET /oauth/callback``).

``integrations receiver`` (and ``make run``) serves it with uvicorn on
``RECEIVER_HOST:RECEIVER_PORT``, in ``RECEIVER_WORKERS`` processes;
``uvicorn --factory tasks.receiver:app_from_settings`` too.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from integrations.auth import keys
from integrations.auth.callback import add_callback
from integrations.config import get_settings, get_webhooks
from integrations.observability import logs
from integrations.services import get_services
from integrations.webhooks.receiver import create_app
from tasks import observe
from tasks.events import publish_event, publish_events

log = logging.getLogger("integrations.webhooks.receiver")


def app_from_settings() -> FastAPI:
    """The receiver as the settings and the services file describe it, with its OAuth callback,
    observed (its ``/metrics``, a count and a span per webhook)."""
    s = get_settings()
    if s.receiver_workers > 1:  # a worker process of uvicorn's: its logging as serve() set it
        logs.setup(s.log_level, s.log_format)
    sources = get_webhooks()
    app = create_app(
        sources, publish_event, get_settings().webhook_max_body_bytes, publish_many=publish_events
    )
    add_callback(app)
    return observe.receiver(app, sources)


def serve() -> None:
    import uvicorn

    s = get_settings()
    keys.require_for(get_services().values())  # the callback stores tokens
    logs.setup(s.log_level, s.log_format)
    sources = get_webhooks()
    for src in sources.values():
        _ = src.secrets  # a secret not set here stops the receiver now, in one line naming it
    if sources:
        log.info("receiving webhooks at /webhooks/{%s}", ",".join(sorted(sources)))
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
        # uvicorn's loggers go through the handler set up above (LOG_FORMAT), not its own.
        log_config=None,
    )
