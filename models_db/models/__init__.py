"""All tables, importable from one place (Alembic's autogenerate reads ``Base.metadata``)."""

from models_db.base import Base
from models_db.models.admin import AdminSession
from models_db.models.catalog import BaseModel, FineTunedModel
from models_db.models.files import File
from models_db.models.jobs import FineTuningJob, JobCheckpoint, JobEvent
from models_db.models.platform import AuditLogEntry, IdempotencyKey, OutboxMessage, UsageRecord
from models_db.models.tenancy import ApiKey, Tenant, User
from models_db.models.webhooks import WebhookAttempt, WebhookDelivery, WebhookEndpoint

__all__ = [
    "AdminSession",
    "ApiKey",
    "AuditLogEntry",
    "Base",
    "BaseModel",
    "File",
    "FineTunedModel",
    "FineTuningJob",
    "IdempotencyKey",
    "JobCheckpoint",
    "JobEvent",
    "OutboxMessage",
    "Tenant",
    "UsageRecord",
    "User",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
]
