"""Settings shared by every deployable (environment variables with the ``LORAPLEX_`` prefix).

Each deployable subclasses :class:`CommonSettings` with its own fields. Settings objects are
created at process start (FastAPI lifespan, Celery worker init, CLI), never at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "dev-secret-key-change-me"  # noqa: S105 - refused outside embedded mode


class CommonSettings(BaseSettings):
    """Where the state lives: database, broker, object storage, secrets."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".loraplex"),
        description="Folder for embedded-mode state (SQLite database, broker, objects, caches).",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Empty: a SQLite file in DATA_DIR (embedded mode). "
        "Production: postgresql+psycopg://user:pass@host/db.",
    )
    broker_url: str = Field(
        default="embedded",
        description="Celery broker. 'embedded': a SQLite-backed kombu broker in DATA_DIR; "
        "production: redis://host:6379/0.",
    )
    storage_url: str = Field(
        default="",
        description="Object storage: file://DIR (default DATA_DIR/objects) or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (SeaweedFS, MinIO); empty for AWS S3.",
    )
    secret_key: str = Field(
        default=DEV_SECRET_KEY,
        description="Server secret: peppers API-key hashes, signs sessions. Must be set "
        "(32+ random characters) outside embedded mode.",
    )
    webhook_allow_hosts: str = Field(
        default="",
        description="Comma-separated hosts exempt from the webhook SSRF checks (e.g. "
        "'127.0.0.1,localhost'): development and tests only.",
    )
    log_level: str = Field(default="INFO", description="Python log level.")
    json_logs: bool = Field(default=True, description="Log one JSON object per line.")

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> CommonSettings:
        data_dir = self.data_dir.expanduser().resolve()
        self.data_dir = data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'loraplex.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{data_dir / 'objects'}"
        if self.broker_url == "embedded":
            self.broker_url = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        if not self.embedded and self.secret_key == DEV_SECRET_KEY:
            raise ValueError(
                "LORAPLEX_SECRET_KEY must be set to a random value outside embedded mode "
                "(the development default is refused with a non-SQLite database)."
            )
        if len(self.secret_key) < 16:
            raise ValueError("LORAPLEX_SECRET_KEY must be at least 16 characters long.")
        if not self.embedded and len(self.secret_key) < 32:
            # Refusing would lock out a deployment made before this check: changing the secret
            # invalidates every API key (docs/operations.md). New ones get the advice.
            logging.getLogger(__name__).warning(
                "LORAPLEX_SECRET_KEY has %d characters; use 32 or more (openssl rand -hex 32)",
                len(self.secret_key),
            )
        return self

    @property
    def webhook_allowed_hosts(self) -> frozenset[str]:
        return frozenset(
            h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip()
        )

    @property
    def embedded(self) -> bool:
        """True when running on the single-machine defaults (SQLite database)."""
        return self.database_url.startswith("sqlite")

    def ensure_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
