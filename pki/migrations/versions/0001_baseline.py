"""Baseline: the inventory tables as the CA created them before migrations (certificates, create requests,
enrolment tokens). A database that has these tables and no version table is stamped with this revision.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from pki.inventory import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("common_name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(1024), nullable=False),
        sa.Column("issuer", sa.String(1024), nullable=False),
        sa.Column("not_before", UTCDateTime(), nullable=False),
        sa.Column("not_after", UTCDateTime(), nullable=False),
        sa.Column("fingerprint_sha256", sa.String(64), nullable=False),
        sa.Column("issued_via", sa.String(16), nullable=False),
        sa.Column("requester", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(64), nullable=True),
        sa.Column("pem", sa.Text(), nullable=False),
    )
    op.create_index("ix_certificates_serial", "certificates", ["serial"], unique=True)
    op.create_index("ix_certificates_name", "certificates", ["name"])
    op.create_index("ix_certificates_status", "certificates", ["status"])
    op.create_table(
        "create_requests",
        sa.Column("serial", sa.String(64), sa.ForeignKey("certificates.serial"), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
    )
    op.create_index("ix_create_requests_name", "create_requests", ["name"])
    op.create_table(
        "enrolment_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("requester", sa.String(255), nullable=True),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.Column("used_serial", sa.String(64), nullable=True),
    )
    op.create_index("ix_enrolment_tokens_token_sha256", "enrolment_tokens", ["token_sha256"], unique=True)
    op.create_index("ix_enrolment_tokens_name", "enrolment_tokens", ["name"])


def downgrade() -> None:
    op.drop_table("enrolment_tokens")
    op.drop_table("create_requests")
    op.drop_table("certificates")
