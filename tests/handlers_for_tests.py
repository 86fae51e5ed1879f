"""Handlers an agent could have written, for the tests (EVENT_HANDLERS=handlers_for_tests).

Each notes in Redis that it ran on an event, so the tests can count runs per handler and event.
An event whose payload says ``"fail": n`` makes :func:`flaky` fail its first n tries.
"""

from __future__ import annotations

import os

import redis

from integrations.events import Event, handler

_redis = redis.Redis.from_url(os.environ["HANDLERS_REDIS_URL"])


def runs_key(handler_name: str, event_id: str) -> str:
    return f"test:runs:{handler_name}:{event_id}"


def _ran(name: str, event: Event) -> int:
    return int(_redis.incr(runs_key(name, event.id)))


@handler("gh:pull_request")
def on_pull_request(event: Event) -> None:
    _ran("on_pull_request", event)


@handler("gh:*")
def on_anything_from_github(event: Event) -> None:
    _ran("on_anything_from_github", event)


@handler("gh:pull_request")
def flaky(event: Event) -> None:
    tries = _ran("flaky", event)
    if tries <= int(event.payload.get("fail", 0)):
        raise RuntimeError(f"flaky failed try {tries}")


@handler("gh_load:push")
def on_load(event: Event) -> None:
    _redis.sadd("test:load:handled", event.payload["n"])
    _ran("on_load", event)


@handler("std:*")
def on_standard(event: Event) -> None:
    _ran("on_standard", event)


@handler("gh:blocking")
def blocking(event: Event) -> None:
    """Runs until the test releases it (at most 30 s)."""
    _redis.blpop([release_key(event.id)], timeout=30)
    _ran("blocking", event)


def release_key(event_id: str) -> str:
    return f"test:release:{event_id}"


@handler("email:received")
def on_email(event: Event) -> None:
    _ran("on_email", event)


@handler("connection:needs_reauth")
def on_needs_reauth(event: Event) -> None:
    """An agent's handler: ask the user to reconnect (here: note which connection it was)."""
    _redis.rpush("test:needs_reauth", f"{event.payload['service']}/{event.payload['connection']}")
    _ran("on_needs_reauth", event)
