"""Dashboard (/admin) logins: one row per session cookie, so any replica can end it."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, Timestamped


class AdminSession(Base, Timestamped):
    """A login. The cookie carries the nonce; the row is found by its SHA-256, so a copy of the
    table alone does not name any cookie."""

    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(nonce), hex
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    expires_at: Mapped[int]
    # Set by logout, a password reset, disabling the user or the tenant, "end sessions".
    revoked_at: Mapped[int | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(40))
    # Refreshed at most once a minute (not a write per request).
    last_seen_at: Mapped[int | None]
