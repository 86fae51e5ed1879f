"""Alembic environment: the URL comes from the project's settings, never from a file."""

from __future__ import annotations

from alembic import context

from integrations.ledger.db import make_engine
from integrations.ledger.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "integrations.ledger.migrate sets sqlalchemy.url"

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
