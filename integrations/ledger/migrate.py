"""Apply the ledger's Alembic migrations to the configured database."""

from __future__ import annotations

import time

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from integrations.config import get_settings
from integrations.errors import IntegrationError
from integrations.ledger.db import make_engine


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "integrations.ledger:migrations")
    # '%' is ConfigParser's interpolation character; a password may contain it.
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the schema up to ``revision``. Safe to run again: applied steps are skipped."""
    command.upgrade(alembic_config(url), revision)


def wait_for_database(url: str | None = None, bound: float | None = None) -> None:
    """Return once the database accepts a connection, trying for up to ``bound`` seconds
    (default ``MIGRATE_WAIT``): a database that is still starting (a container's first start,
    a restart) is waited for rather than failed on.

    Raises :class:`IntegrationError` once the bound has passed, naming the host and the last
    reason (refused, a name that does not resolve, the server's own refusal). A SQLite ledger
    is a local file: nothing to wait for.
    """
    url = url or get_settings().database_url
    bound = get_settings().migrate_wait if bound is None else bound
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return
    deadline = time.monotonic() + bound
    pause = 0.25
    engine = make_engine(url)
    try:
        while True:
            try:
                with engine.connect():
                    return
            except OperationalError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IntegrationError(
                        f"the ledger database at {u.host}:{u.port or 5432} did not accept a connection "
                        f"within {bound:g} s (MIGRATE_WAIT): {_reason(e)}"
                    ) from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)
    finally:
        engine.dispose()


def _reason(e: OperationalError) -> str:
    """The driver's reason, without its preamble: ``Connection refused``, ``FATAL: ...``."""
    line = (str(e.orig).splitlines() or [""])[0]
    return " ".join(line.rsplit("failed: ", 1)[-1].split()) or type(e.orig).__name__
