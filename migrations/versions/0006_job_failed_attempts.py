"""fine_tuning_jobs.failed_attempts: failures counted apart from the attempt (fencing) number

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode keeps the same migration working on SQLite (embedded mode). Existing jobs start
    # at 0: their attempts so far may have been pauses as well as failures.
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(
            sa.Column("failed_attempts", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("failed_attempts")
