"""job scheduling columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 21:36:07.374754
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode keeps the same migration working on SQLite (embedded mode).
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(sa.Column("claimed_at_ns", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column(
                "artifacts",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("artifacts")
        batch.drop_column("claimed_at_ns")
