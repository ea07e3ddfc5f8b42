"""Baseline: the readings table as the dashboard created it before migrations.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "readings",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("device_timestamp", sa.String(64), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
    )
    op.create_index("ix_readings_received_at", "readings", ["received_at"])
    op.create_index("ix_readings_device_received", "readings", ["device_id", "received_at"])


def downgrade() -> None:
    op.drop_table("readings")
