"""Apply the ledger's Alembic migrations to the configured database."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from integrations.config import get_settings


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "integrations.ledger:migrations")
    # '%' is ConfigParser's interpolation character; a password may contain it.
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the schema up to ``revision``. Safe to run again: applied steps are skipped."""
    command.upgrade(alembic_config(url), revision)
