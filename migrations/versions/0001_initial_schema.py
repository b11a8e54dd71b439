"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 21:18:21.329621
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=True),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('target_type', sa.String(length=40), nullable=False),
    sa.Column('target_id', sa.String(length=400), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_index('ix_audit_log_tenant_id_created_at', 'audit_log', ['tenant_id', 'created_at'], unique=False)
    op.create_table('base_models',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=1000), nullable=False),
    sa.Column('context_length', sa.BigInteger(), nullable=False),
    sa.Column('info', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_models'))
    )
    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('task', sa.String(length=200), nullable=False),
    sa.Column('queue', sa.String(length=50), nullable=False),
    sa.Column('args', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=True),
    sa.Column('published_at', sa.BigInteger(), nullable=True),
    sa.Column('publish_attempts', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    op.create_index('ix_outbox_unpublished', 'outbox', ['published_at', 'id'], unique=False)
    op.create_table('tenants',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('slug', sa.String(length=40), nullable=False),
    sa.Column('max_concurrent_jobs', sa.BigInteger(), nullable=False),
    sa.Column('max_stored_bytes', sa.BigInteger(), nullable=False),
    sa.Column('max_requests_per_minute', sa.BigInteger(), nullable=False),
    sa.Column('max_tokens_per_minute', sa.BigInteger(), nullable=False),
    sa.Column('disabled_at', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('slug', name=op.f('uq_tenants_slug'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('display_prefix', sa.String(length=16), nullable=False),
    sa.Column('scopes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_by', sa.String(length=40), nullable=True),
    sa.Column('last_used_at', sa.BigInteger(), nullable=True),
    sa.Column('revoked_at', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.create_table('files',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=40), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('storage_key', sa.String(length=500), nullable=False),
    sa.Column('format', sa.String(length=20), nullable=False),
    sa.Column('examples', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('deleted_at', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_files_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_files'))
    )
    op.create_index('ix_files_tenant_id_id', 'files', ['tenant_id', 'id'], unique=False)
    op.create_table('idempotency_keys',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('status_code', sa.BigInteger(), nullable=False),
    sa.Column('response', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_idempotency_keys_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_table('usage_records',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('quantity', sa.BigInteger(), nullable=False),
    sa.Column('model', sa.String(length=400), nullable=True),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_records_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_records'))
    )
    op.create_index('ix_usage_records_tenant_id_created_at', 'usage_records', ['tenant_id', 'created_at'], unique=False)
    op.create_table('users',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=True),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('password_hash', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('disabled_at', sa.BigInteger(), nullable=True),
    sa.Column('last_login_at', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_users_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('email', name=op.f('uq_users_email'))
    )
    op.create_index(op.f('ix_users_tenant_id'), 'users', ['tenant_id'], unique=False)
    op.create_table('fine_tuning_jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('base_model_id', sa.String(length=200), nullable=False),
    sa.Column('training_file_id', sa.String(length=40), nullable=False),
    sa.Column('validation_file_id', sa.String(length=40), nullable=True),
    sa.Column('suffix', sa.String(length=64), nullable=True),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('method', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('error', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('fine_tuned_model', sa.String(length=400), nullable=True),
    sa.Column('trained_tokens', sa.BigInteger(), nullable=True),
    sa.Column('started_at', sa.BigInteger(), nullable=True),
    sa.Column('finished_at', sa.BigInteger(), nullable=True),
    sa.Column('estimated_finish', sa.BigInteger(), nullable=True),
    sa.Column('attempt', sa.BigInteger(), nullable=False),
    sa.Column('max_attempts', sa.BigInteger(), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('lease_until', sa.BigInteger(), nullable=True),
    sa.Column('cancel_requested_at', sa.BigInteger(), nullable=True),
    sa.Column('pause_requested_at', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_fine_tuning_jobs_base_model_id_base_models')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_fine_tuning_jobs_tenant_id_tenants')),
    sa.ForeignKeyConstraint(['training_file_id'], ['files.id'], name=op.f('fk_fine_tuning_jobs_training_file_id_files')),
    sa.ForeignKeyConstraint(['validation_file_id'], ['files.id'], name=op.f('fk_fine_tuning_jobs_validation_file_id_files')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fine_tuning_jobs'))
    )
    op.create_index('ix_fine_tuning_jobs_status', 'fine_tuning_jobs', ['status'], unique=False)
    op.create_index('ix_fine_tuning_jobs_tenant_id_id', 'fine_tuning_jobs', ['tenant_id', 'id'], unique=False)
    op.create_table('fine_tuned_models',
    sa.Column('id', sa.String(length=400), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('base_model_id', sa.String(length=200), nullable=False),
    sa.Column('storage_prefix', sa.String(length=500), nullable=False),
    sa.Column('manifest_sha256', sa.String(length=64), nullable=False),
    sa.Column('lora_rank', sa.BigInteger(), nullable=False),
    sa.Column('retired_at', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'], name=op.f('fk_fine_tuned_models_base_model_id_base_models')),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_jobs.id'], name=op.f('fk_fine_tuned_models_job_id_fine_tuning_jobs')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_fine_tuned_models_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fine_tuned_models')),
    sa.UniqueConstraint('job_id', name=op.f('uq_fine_tuned_models_job_id'))
    )
    op.create_index(op.f('ix_fine_tuned_models_tenant_id'), 'fine_tuned_models', ['tenant_id'], unique=False)
    op.create_table('job_checkpoints',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('storage_prefix', sa.String(length=500), nullable=False),
    sa.Column('manifest_sha256', sa.String(length=64), nullable=False),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_jobs.id'], name=op.f('fk_job_checkpoints_job_id_fine_tuning_jobs')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_job_checkpoints_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_checkpoints'))
    )
    op.create_index('ix_job_checkpoints_job_id_step', 'job_checkpoints', ['job_id', 'step'], unique=True)
    op.create_table('job_events',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('level', sa.String(length=10), nullable=False),
    sa.Column('type', sa.String(length=10), nullable=False),
    sa.Column('message', sa.String(length=2000), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['fine_tuning_jobs.id'], name=op.f('fk_job_events_job_id_fine_tuning_jobs')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_job_events_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_job_events')),
    sa.UniqueConstraint('id', name=op.f('uq_job_events_id'))
    )
    op.create_index('ix_job_events_job_id_seq', 'job_events', ['job_id', 'seq'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_job_events_job_id_seq', table_name='job_events')
    op.drop_table('job_events')
    op.drop_index('ix_job_checkpoints_job_id_step', table_name='job_checkpoints')
    op.drop_table('job_checkpoints')
    op.drop_index(op.f('ix_fine_tuned_models_tenant_id'), table_name='fine_tuned_models')
    op.drop_table('fine_tuned_models')
    op.drop_index('ix_fine_tuning_jobs_tenant_id_id', table_name='fine_tuning_jobs')
    op.drop_index('ix_fine_tuning_jobs_status', table_name='fine_tuning_jobs')
    op.drop_table('fine_tuning_jobs')
    op.drop_index(op.f('ix_users_tenant_id'), table_name='users')
    op.drop_table('users')
    op.drop_index('ix_usage_records_tenant_id_created_at', table_name='usage_records')
    op.drop_table('usage_records')
    op.drop_table('idempotency_keys')
    op.drop_index('ix_files_tenant_id_id', table_name='files')
    op.drop_table('files')
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('tenants')
    op.drop_index('ix_outbox_unpublished', table_name='outbox')
    op.drop_table('outbox')
    op.drop_table('base_models')
    op.drop_index('ix_audit_log_tenant_id_created_at', table_name='audit_log')
    op.drop_table('audit_log')
