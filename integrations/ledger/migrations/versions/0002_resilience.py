"""replay links, breaker events

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from integrations.ledger.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("replay_of", sa.String(36), nullable=True))
    op.create_index("ix_jobs_status_next_attempt_at", "jobs", ["status", "next_attempt_at"])
    op.create_table(
        "breaker_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("service", sa.String(100), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_breaker_events_service_at", "breaker_events", ["service", "at"])


def downgrade() -> None:
    op.drop_table("breaker_events")
    op.drop_index("ix_jobs_status_next_attempt_at", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("replay_of")
