"""index api_keys.revoked_at (the gateway's revocation watch)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 08:20:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f('ix_api_keys_revoked_at'), 'api_keys', ['revoked_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_api_keys_revoked_at'), table_name='api_keys')
