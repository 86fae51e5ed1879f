"""indexes for statistics over time windows and for pruning, on a ledger of millions of jobs

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27

On Postgres the indexes are built CONCURRENTLY (outside the migration's transaction), so a
deployment's workers and receiver keep writing while a large ledger is indexed. Should such a
build be interrupted, Postgres leaves the index INVALID: drop it and run the migration again.
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_jobs_service_operation_latency_ms",
            "jobs",
            # The columns after latency_ms make it covering (SQLite has no INCLUDE).
            ["service", "operation", "latency_ms", "status", "created_at", "input_tokens", "output_tokens"],
            postgresql_concurrently=True,
        )
        op.create_index("ix_jobs_created_at", "jobs", ["created_at"], postgresql_concurrently=True)
        op.create_index(
            "ix_health_checks_service_ok_checked_at",
            "health_checks",
            ["service", "ok", "checked_at"],
            postgresql_concurrently=True,
        )
        op.create_index(
            "ix_deliveries_finished_at", "deliveries", ["finished_at"], postgresql_concurrently=True
        )
        # The new stats index leads with these two; uq_job_attempts_job_id_number leads with job_id.
        op.drop_index("ix_jobs_service_operation", "jobs", postgresql_concurrently=True)
        op.drop_index("ix_job_attempts_job_id", "job_attempts", postgresql_concurrently=True)
    if op.get_bind().dialect.name == "postgresql":
        # The stats index is read alone only where the visibility map says the rows are visible
        # to all; every job is inserted then updated twice, so by default 20% of a ledger may
        # wait for autovacuum (measured: stats 2.5 times slower with a fifth of the rows
        # updated since). Vacuum the jobs at 2% of changed or inserted rows.
        op.execute(
            "ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.02, "
            "autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE jobs RESET (autovacuum_vacuum_scale_factor, "
            "autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor)"
        )
    with op.get_context().autocommit_block():
        op.create_index("ix_job_attempts_job_id", "job_attempts", ["job_id"], postgresql_concurrently=True)
        op.create_index(
            "ix_jobs_service_operation", "jobs", ["service", "operation"], postgresql_concurrently=True
        )
        op.drop_index("ix_deliveries_finished_at", "deliveries", postgresql_concurrently=True)
        op.drop_index("ix_health_checks_service_ok_checked_at", "health_checks", postgresql_concurrently=True)
        op.drop_index("ix_jobs_created_at", "jobs", postgresql_concurrently=True)
        op.drop_index("ix_jobs_service_operation_latency_ms", "jobs", postgresql_concurrently=True)
