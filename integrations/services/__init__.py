"""Kinds of service and the services of the services file.

A kind is a :class:`~integrations.services.base.Service` subclass registered under the
``integrations.kinds`` entry-point group (ours too), so a package adds a kind without touching
this one::

    [project.entry-points."integrations.kinds"]
    ticketing = "my_package.ticketing:TicketingService"

``kind:`` in the services file picks the class (``rest`` when left out); the class validates
its own fields, so an error names the kind's own field.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path

from integrations import redact
from integrations.config import Settings, get_settings
from integrations.config.loading import entries, interpolate, read_file, services_settings_check, validate
from integrations.errors import ConfigError
from integrations.services.base import Attempt, Operation, Outcome, Scope, Service, Usage

__all__ = [
    "Attempt",
    "Operation",
    "Outcome",
    "Scope",
    "Service",
    "Usage",
    "get_services",
    "kinds",
    "load_services",
]

ENTRY_POINTS = "integrations.kinds"
DEFAULT_KIND = "rest"


@functools.cache
def kinds() -> dict[str, type[Service]]:
    """Every installed kind by name."""
    found: dict[str, type[Service]] = {}
    for ep in entry_points(group=ENTRY_POINTS):
        try:
            cls = ep.load()
        except Exception as e:
            raise ConfigError(f"kind {ep.name}: cannot load {ep.value} ({type(e).__name__}: {e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Service)):
            raise ConfigError(f"kind {ep.name}: {ep.value} is not a Service subclass")
        found[ep.name] = cls
    if not found:
        raise ConfigError("no service kinds are installed: install this package (pip install -e .)")
    return found


def load_services(path: Path, settings: Settings | None = None) -> dict[str, Service]:
    """Read and validate the ``services:`` section. Raises :class:`ConfigError` naming the
    service and the field (the kind's own field when one of them is wrong)."""
    settings = settings or get_settings()
    raw = read_file(path)
    installed = kinds()
    services: dict[str, Service] = {}
    for name, (where, spec) in entries(raw, "services").items():
        kind = spec.get("kind", DEFAULT_KIND)
        cls = installed.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ConfigError(f"{where}.kind: unknown kind; installed: {', '.join(sorted(installed))}")
        substituted: list[tuple[str, str]] = []
        values = interpolate(spec, where, substituted)
        svc = validate(cls, {**values, "kind": kind}, where, name=name)
        services_settings_check(settings, where, svc.retry.backoff_max, svc.retry.retry_after_max)
        # What came from the environment into a header, or inside a longer value (a token in a
        # URL's path), is a credential too: scrubbed from answers, masked in logs.
        svc._extra_secrets = tuple(
            v for w, v in substituted if w.startswith(f"{where}.headers.") or w.endswith("#path")
        )
        redact.register(*svc._extra_secrets)
        services[name] = svc
    return services


@functools.cache
def get_services() -> dict[str, Service]:
    settings = get_settings()
    return load_services(settings.services_file, settings)
