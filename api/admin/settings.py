"""Settings of the admin dashboard (environment variables with the ``LORAPLEX_`` prefix)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AdminSettings(BaseSettings):
    """Read once when the API starts (the admin router's lifespan)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    gateway_url: str = Field(
        default="",
        description="Base URL of the inference gateway; the overview shows its replicas and "
        "loaded adapters from its /internal/replicas. Empty: 'gateway not configured'.",
    )
    admin_session_hours: float = Field(
        default=8.0,
        gt=0,
        description="Lifetime of a dashboard login; the session cookie is refused after it.",
    )
    admin_secure_cookies: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Secure flag of the dashboard cookies: 'auto' sets it when the request "
        "arrived over HTTPS (run uvicorn with --proxy-headers behind a TLS proxy), 'always' "
        "sets it unconditionally.",
    )
    admin_login_attempts: int = Field(
        default=5,
        ge=1,
        description="Failed logins allowed per email and client address within the window; "
        "more get 429.",
    )
    admin_login_window_seconds: float = Field(
        default=60.0, gt=0, description="Window of the login throttle, in seconds."
    )
    admin_poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a running job's page refreshes its status and loss chart.",
    )
