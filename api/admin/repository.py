"""Queries of the dashboard.

A tenant-owned table is read through :func:`readable`: a tenant's users get the statement of
that table's :class:`~api.scoping.TenantScopedRepository` (the one place the tenant filter is
written); only platform admins, who may see every tenant, get the unfiltered statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.orm import Session

from api.catalog.repository import FineTunedModelRepository
from api.files.repository import FileRepository
from api.fine_tuning.repository import CheckpointRepository, JobEventRepository, JobRepository
from api.scoping import TenantScopedRepository
from api.webhooks.service import DeliveryRepository, EndpointRepository
from common.ids import is_plausible_id
from common.jobs import JobStatus
from models_db.models import (
    AdminSession,
    ApiKey,
    AuditLogEntry,
    File,
    FineTunedModel,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    Tenant,
    UsageRecord,
    User,
    WebhookDelivery,
    WebhookEndpoint,
)


class ApiKeyScope(TenantScopedRepository[ApiKey]):
    model = ApiKey


class UserScope(TenantScopedRepository[User]):
    model = User


class UsageScope(TenantScopedRepository[UsageRecord]):
    model = UsageRecord


def readable(
    session: Session, repository: type[TenantScopedRepository[Any]], tenant_id: str | None
) -> Select[Any]:
    """``SELECT`` of the repository's table as a viewer sees it; ``tenant_id`` None: all."""
    if tenant_id is None:
        return select(repository.model)
    return repository(session, tenant_id).select()


class AdminRepository:
    def __init__(self, session: Session, tenant_id: str | None) -> None:
        """``tenant_id``: the viewer's tenant, or None for a platform admin (every tenant)."""
        self.session = session
        self.tenant_id = tenant_id

    def _rows(self, stmt: Select[Any]) -> Sequence[Any]:
        return self.session.scalars(stmt).all()

    # --- users and tenants (platform-level tables) --------------------------------------

    def login_session(
        self, user_id: str, session_id: str
    ) -> tuple[User, Tenant | None, AdminSession | None] | None:
        """A user, their tenant and the ``admin_sessions`` row of one cookie (one query)."""
        if not is_plausible_id(user_id):
            return None
        row = self.session.execute(
            select(User, Tenant, AdminSession)
            .outerjoin(Tenant, Tenant.id == User.tenant_id)
            .outerjoin(
                AdminSession,
                (AdminSession.id == session_id) & (AdminSession.user_id == User.id),
            )
            .where(User.id == user_id)
        ).first()
        return (row[0], row[1], row[2]) if row else None

    def user_by_email(self, email: str) -> User | None:
        return self.session.scalars(select(User).where(User.email == email.lower())).first()

    def tenants(self) -> Sequence[Tenant]:
        stmt = select(Tenant).order_by(Tenant.created_at.desc(), Tenant.id.desc())
        if self.tenant_id is not None:
            stmt = stmt.where(Tenant.id == self.tenant_id)
        return self._rows(stmt)

    def tenant(self, tenant_id: str) -> Tenant | None:
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            return None
        return self.session.get(Tenant, tenant_id) if is_plausible_id(tenant_id) else None

    def tenant_for_update(self, tenant_id: str) -> Tenant | None:
        if self.tenant(tenant_id) is None:
            return None
        return self.session.scalars(
            select(Tenant).where(Tenant.id == tenant_id).with_for_update()
        ).first()

    def users(self, tenant_id: str | None = None) -> Sequence[User]:
        """The users the viewer may manage; a platform admin may narrow them to one tenant."""
        stmt = readable(self.session, UserScope, self.tenant_id)
        if tenant_id:
            stmt = stmt.where(User.tenant_id == tenant_id)
        return self._rows(stmt.order_by(User.tenant_id.is_not(None), User.email))

    def visible_user(self, user_id: str, *, for_update: bool = False) -> User | None:
        """One user, if the viewer may see it (another tenant's user is not found)."""
        if not is_plausible_id(user_id):
            return None
        stmt = readable(self.session, UserScope, self.tenant_id).where(User.id == user_id)
        return self.session.scalars(stmt.with_for_update() if for_update else stmt).first()

    def users_of(self, tenant_id: str) -> Sequence[User]:
        return self._rows(readable(self.session, UserScope, tenant_id).order_by(User.email))

    def platform_users(self) -> Sequence[User]:
        return self._rows(select(User).where(User.tenant_id.is_(None)).order_by(User.email))

    def keys_of(self, tenant_id: str) -> Sequence[ApiKey]:
        stmt = readable(self.session, ApiKeyScope, tenant_id)
        return self._rows(stmt.order_by(ApiKey.id.desc()))

    # --- dashboard sessions (admin_sessions) -----------------------------------------------

    def add_session(self, row: AdminSession) -> None:
        self.session.add(row)

    def delete_expired_sessions(self, user_id: str, now: int) -> None:
        self.session.execute(
            delete(AdminSession).where(
                AdminSession.user_id == user_id, AdminSession.expires_at < now
            )
        )

    def revoke_sessions(
        self,
        now: int,
        reason: str,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        tenant_id: str | None = None,
    ) -> int:
        """Revoke the live sessions of one session, one user or every user of one tenant;
        returns how many ended."""
        stmt = update(AdminSession).where(
            AdminSession.revoked_at.is_(None), AdminSession.expires_at >= now
        )
        if session_id is not None:
            stmt = stmt.where(AdminSession.id == session_id)
        if user_id is not None:
            stmt = stmt.where(AdminSession.user_id == user_id)
        if tenant_id is not None:
            stmt = stmt.where(
                AdminSession.user_id.in_(select(User.id).where(User.tenant_id == tenant_id))
            )
        if session_id is None and user_id is None and tenant_id is None:
            raise ValueError("say which sessions to revoke")
        result = self.session.execute(
            stmt.values(revoked_at=now, revoked_reason=reason).execution_options(
                synchronize_session=False
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def live_session_counts(self, user_ids: Sequence[str], now: int) -> dict[str, int]:
        if not user_ids:
            return {}
        stmt = (
            select(AdminSession.user_id, func.count())
            .where(
                AdminSession.user_id.in_(list(user_ids)),
                AdminSession.revoked_at.is_(None),
                AdminSession.expires_at >= now,
            )
            .group_by(AdminSession.user_id)
        )
        return {user_id: int(n) for user_id, n in self.session.execute(stmt)}

    def sessions_of(self, user_id: str, limit: int = 20) -> Sequence[AdminSession]:
        stmt = (
            select(AdminSession)
            .where(AdminSession.user_id == user_id)
            .order_by(AdminSession.created_at.desc())
            .limit(limit)
        )
        return self._rows(stmt)

    # --- jobs ---------------------------------------------------------------------------

    def job_counts(self) -> dict[str, int]:
        stmt = readable(self.session, JobRepository, self.tenant_id)
        counted = stmt.with_only_columns(FineTuningJob.status, func.count()).group_by(
            FineTuningJob.status
        )
        return {status: int(n) for status, n in self.session.execute(counted)}

    def jobs(
        self,
        *,
        status: str | None = None,
        tenant_id: str | None = None,
        model: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> tuple[Sequence[FineTuningJob], bool]:
        stmt = readable(self.session, JobRepository, self.tenant_id)
        if status:
            stmt = stmt.where(FineTuningJob.status == status)
        if tenant_id:
            stmt = stmt.where(FineTuningJob.tenant_id == tenant_id)
        if model:
            stmt = stmt.where(
                (FineTuningJob.base_model_id == model) | (FineTuningJob.fine_tuned_model == model)
            )
        if before and is_plausible_id(before):
            stmt = stmt.where(FineTuningJob.id < before)
        rows = self._rows(stmt.order_by(FineTuningJob.id.desc()).limit(limit + 1))
        return rows[:limit], len(rows) > limit

    def job_tenant(self, job_id: str) -> str | None:
        """Which tenant owns a job, as far as the viewer may know (None: not found)."""
        if not is_plausible_id(job_id):
            return None
        stmt = readable(self.session, JobRepository, self.tenant_id)
        return self.session.scalar(
            stmt.with_only_columns(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id)
        )

    def workers_alive(self, now: int) -> list[str]:
        """Workers holding a fresh lease on a running job (an idle worker holds none)."""
        stmt = (
            select(FineTuningJob.worker_id)
            .where(
                FineTuningJob.status == JobStatus.RUNNING,
                FineTuningJob.worker_id.is_not(None),
                FineTuningJob.lease_until >= now,
            )
            .distinct()
        )
        return sorted(w for w in self.session.scalars(stmt) if w)

    def metric_events(self, tenant_id: str, job_id: str) -> Sequence[JobEvent]:
        stmt = readable(self.session, JobEventRepository, tenant_id)
        stmt = stmt.where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        return self._rows(stmt.order_by(JobEvent.seq))

    def events(self, tenant_id: str, job_id: str, limit: int = 100) -> Sequence[JobEvent]:
        rows, _ = JobEventRepository(self.session, tenant_id).list(job_id, after=None, limit=limit)
        return rows

    def checkpoints(self, tenant_id: str, job_id: str) -> Sequence[JobCheckpoint]:
        rows, _ = CheckpointRepository(self.session, tenant_id).list(job_id, after=None, limit=100)
        return rows

    # --- files, models, webhooks ----------------------------------------------------------

    def files(self, limit: int = 200) -> Sequence[File]:
        stmt = readable(self.session, FileRepository, self.tenant_id)
        return self._rows(stmt.order_by(File.id.desc()).limit(limit))

    def fine_tuned_models(self, limit: int = 200) -> Sequence[FineTunedModel]:
        stmt = readable(self.session, FineTunedModelRepository, self.tenant_id)
        return self._rows(stmt.order_by(FineTunedModel.created_at.desc()).limit(limit))

    def model_tenant(self, model_id: str) -> str | None:
        if not is_plausible_id(model_id):
            return None
        stmt = readable(self.session, FineTunedModelRepository, self.tenant_id)
        return self.session.scalar(
            stmt.with_only_columns(FineTunedModel.tenant_id).where(FineTunedModel.id == model_id)
        )

    def endpoints(self) -> Sequence[WebhookEndpoint]:
        stmt = readable(self.session, EndpointRepository, self.tenant_id)
        stmt = stmt.where(WebhookEndpoint.deleted_at.is_(None))
        return self._rows(stmt.order_by(WebhookEndpoint.id.desc()))

    def endpoint_tenant(self, endpoint_id: str) -> str | None:
        if not is_plausible_id(endpoint_id):
            return None
        stmt = readable(self.session, EndpointRepository, self.tenant_id)
        return self.session.scalar(
            stmt.with_only_columns(WebhookEndpoint.tenant_id).where(
                WebhookEndpoint.id == endpoint_id
            )
        )

    def failed_deliveries(self, limit: int = 10) -> Sequence[WebhookDelivery]:
        stmt = readable(self.session, DeliveryRepository, self.tenant_id)
        stmt = stmt.where(WebhookDelivery.status == "failed")
        return self._rows(stmt.order_by(WebhookDelivery.id.desc()).limit(limit))

    # --- usage and audit ------------------------------------------------------------------

    def usage_by_day(self, days: int, now: int) -> list[tuple[str, int, str, int]]:
        """(tenant id, day as a Unix time, kind, quantity) for the last ``days`` days."""
        day = (UsageRecord.created_at // 86400) * 86400
        scoped = readable(self.session, UsageScope, self.tenant_id)
        stmt = (
            scoped.with_only_columns(
                UsageRecord.tenant_id,
                day.label("day"),
                UsageRecord.kind,
                func.sum(UsageRecord.quantity),
            )
            .where(UsageRecord.created_at >= now - days * 86400)
            .group_by(UsageRecord.tenant_id, day, UsageRecord.kind)
            .order_by(day.desc(), UsageRecord.tenant_id)
        )
        return [(t, int(d), k, int(q)) for t, d, k, q in self.session.execute(stmt)]

    def audit(
        self, *, action: str | None = None, before: int | None = None, limit: int = 100
    ) -> tuple[Sequence[AuditLogEntry], bool]:
        stmt = select(AuditLogEntry)
        if self.tenant_id is not None:
            # The audit log is not a tenant-owned table (platform rows have no tenant), so it
            # has no scoped repository; a tenant's users see their tenant's rows only.
            stmt = stmt.where(AuditLogEntry.tenant_id == self.tenant_id)
        if action:
            stmt = stmt.where(AuditLogEntry.action == action)
        if before is not None:
            stmt = stmt.where(AuditLogEntry.id < before)
        rows = self._rows(stmt.order_by(AuditLogEntry.id.desc()).limit(limit + 1))
        return rows[:limit], len(rows) > limit
