"""The durable record of every job: models, engine, queries and migrations."""

from integrations.ledger import jobs

__all__ = ["jobs"]
