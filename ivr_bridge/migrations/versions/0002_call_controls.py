"""Transfers and hang-ups claimed, one per call, across every instance sharing the records.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ivr_call_controls",
        sa.Column("call_sid", sa.String(64), primary_key=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("instance_id", sa.Text, nullable=False),
        sa.Column("claimed_at", TIME, nullable=False),
        sa.Column("result", JSON),
    )


def downgrade() -> None:
    op.drop_table("ivr_call_controls")
