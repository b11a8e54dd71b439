"""files.expires_at: OpenAI's expires_after on upload (NULL: kept until deleted)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 19:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode keeps the same migration working on SQLite (embedded mode).
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.BigInteger(), nullable=True))
    # The expiry sweep looks for live files past their time (deleted ones keep expires_at).
    op.create_index("ix_files_expiry", "files", ["deleted_at", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_files_expiry", table_name="files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("expires_at")
