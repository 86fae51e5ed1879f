"""Event handlers: functions an agent registers for events by source and type.

::

    from integrations.events import Event, handler

    @handler("github:pull_request")
    def review(event: Event) -> None:
        ...

A pattern is ``source:type`` with ``*`` wildcards (``github:*``, ``*``). The source is the
webhook source's name in the services file, or ``email`` for mailboxes. Workers import the
modules named in ``EVENT_HANDLERS``; each matching handler runs as its own Celery task.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from integrations.errors import ConfigError


@dataclass(frozen=True)
class Event:
    id: str
    source: str
    type: str
    payload: Any
    received_at: dt.datetime


Handler = Callable[[Event], object]

#: Handler name (``module.function``) -> (pattern, function).
_registry: dict[str, tuple[str, Handler]] = {}


def handler(pattern: str) -> Callable[[Handler], Handler]:
    """Register the decorated function for events matching ``pattern``."""
    if pattern != "*" and ":" not in pattern:
        raise ConfigError(f"handler pattern {pattern!r}: expected source:type, e.g. github:push or slack:*")

    def register(fn: Handler) -> Handler:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if len(name) > 255:  # the ledger's column
            raise ConfigError(f"handler name {name[:60]}... is longer than 255 characters")
        _registry[name] = (pattern, fn)
        return fn

    return register


def handlers_for(source: str, event_type: str) -> list[str]:
    """The names of the handlers an event of ``source`` and ``event_type`` goes to, sorted."""
    key = f"{source}:{event_type}"
    return sorted(name for name, (pattern, _) in _registry.items() if fnmatch.fnmatchcase(key, pattern))


def get_handler(name: str) -> Handler | None:
    entry = _registry.get(name)
    return entry[1] if entry else None


def load_handlers(modules: Iterable[str]) -> None:
    """Import the modules that register handlers (``EVENT_HANDLERS``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"EVENT_HANDLERS: cannot import {module} ({e})") from None
