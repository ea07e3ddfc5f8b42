"""The lockout's failures in the database: counted per requester, kept across restarts, shared by every
CA process.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lockout_failures",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("failed_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_lockout_failures_key", "lockout_failures", ["key"])
    op.create_index("ix_lockout_failures_failed_at", "lockout_failures", ["failed_at"])


def downgrade() -> None:
    op.drop_table("lockout_failures")
