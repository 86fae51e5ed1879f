"""Configuration: settings from the environment (:mod:`.settings`), the services file's shared
schema (:mod:`.schema`), secrets resolved where they are used (:mod:`.secrets`), and reading
the file (:mod:`.loading`). The services themselves are loaded by :mod:`integrations.services`,
which knows the kinds."""

from integrations.config.loading import get_mailboxes, get_webhooks, load_mailboxes, load_webhooks
from integrations.config.schema import (
    Breaker,
    HealthCheck,
    Mailbox,
    Rate,
    RetryPolicy,
    WebhookSource,
)
from integrations.config.secrets import Secret
from integrations.config.settings import Settings, get_settings, load_settings

__all__ = [
    "Breaker",
    "HealthCheck",
    "Mailbox",
    "Rate",
    "RetryPolicy",
    "Secret",
    "Settings",
    "WebhookSource",
    "get_mailboxes",
    "get_settings",
    "get_webhooks",
    "load_mailboxes",
    "load_settings",
    "load_webhooks",
]
