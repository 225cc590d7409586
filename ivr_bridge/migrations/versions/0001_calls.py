"""The call records: one row per call, and every event of it.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out (not imported from ivr_bridge.records): a revision must stay what it was.
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ivr_calls",
        sa.Column("call_sid", sa.String(64), primary_key=True),
        sa.Column("stream_sid", sa.Text),
        sa.Column("account_sid", sa.Text),
        sa.Column("from_number", sa.Text),
        sa.Column("to_number", sa.Text),
        sa.Column("custom_parameters", JSON),
        sa.Column("provider", sa.Text),
        sa.Column("instance_id", sa.Text, nullable=False),
        sa.Column("started_at", TIME, nullable=False),
        sa.Column("ended_at", TIME),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("duration_s", sa.Float),
        sa.Column("turns", sa.Integer),
        sa.Column("barge_ins", sa.Integer),
        sa.Column("emotions", JSON),
        sa.Column("latency", JSON),
        sa.Column("transfer_to", sa.Text),
        sa.Column("fallback", sa.Text),
        sa.Column("end_data", JSON),
    )
    op.create_index("ix_ivr_calls_started_at", "ivr_calls", ["started_at"])
    op.create_index("ix_ivr_calls_instance_outcome", "ivr_calls", ["instance_id", "outcome"])
    op.create_table(
        "ivr_call_events",
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("elapsed", sa.Float, nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("event_id", sa.String(64)),
        sa.PrimaryKeyConstraint("call_sid", "seq", name="pk_ivr_call_events"),
    )


def downgrade() -> None:
    op.drop_table("ivr_call_events")
    op.drop_index("ix_ivr_calls_instance_outcome", table_name="ivr_calls")
    op.drop_index("ix_ivr_calls_started_at", table_name="ivr_calls")
    op.drop_table("ivr_calls")
