"""health checks, the submitting agent, one row per attempt number

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from integrations.ledger.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("agent", sa.String(100), nullable=True))
    op.create_index("ix_jobs_replay_of", "jobs", ["replay_of"])
    # A ledger write retried after a lost reply must not store the same attempt twice.
    op.create_index("uq_job_attempts_job_id_number", "job_attempts", ["job_id", "number"], unique=True)
    op.create_table(
        "health_checks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("service", sa.String(100), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("checked_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_health_checks_service_checked_at", "health_checks", ["service", "checked_at"])


def downgrade() -> None:
    op.drop_table("health_checks")
    op.drop_index("uq_job_attempts_job_id_number", "job_attempts")
    op.drop_index("ix_jobs_replay_of", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("agent")
