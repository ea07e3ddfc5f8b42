"""Dashboard accounts and API tokens (operator access).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from pki.inventory import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dashboard_users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("password_changed_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_dashboard_users_username", "dashboard_users", ["username"], unique=True)
    op.create_table(
        "dashboard_api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_dashboard_api_tokens_token_sha256", "dashboard_api_tokens", ["token_sha256"], unique=True)


def downgrade() -> None:
    op.drop_table("dashboard_api_tokens")
    op.drop_table("dashboard_users")
