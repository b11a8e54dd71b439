"""The control-plane FastAPI application (files, fine-tuning jobs, models, operations)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.orm import Session

from api.admin.router import router as admin_router
from api.catalog.router import router as models_router
from api.errors import install_error_handlers
from api.files.router import router as files_router
from api.fine_tuning.router import router as jobs_router
from api.middleware import RequestContextMiddleware, RequestLimitsMiddleware
from api.ops.router import router as ops_router
from api.services import Services
from api.settings import APISettings
from api.tenancy.cache import TtlCache
from api.webhooks.router import router as webhooks_router
from common.broker import make_publisher
from common.logging import configure_logging
from common.outbox import Dispatcher
from common.storage import storage_from_url
from models_db.models import OutboxMessage
from models_db.session import make_engine, make_session_factory

# Multipart framing around an uploaded file: boundaries, headers, the purpose field.
_FORM_OVERHEAD = 64 * 1024


def build_services(settings: APISettings) -> Services:
    settings.ensure_data_dir()
    # More connections than request threads (anyio's default is 40): a thread that holds a
    # connection never waits for another thread, so the pool cannot deadlock under load.
    engine = make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size + 40,
        lock_timeout_ms=5000,
        pre_ping=False,
    )
    return Services(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        storage=storage_from_url(
            settings.storage_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            base_dir=str(settings.data_dir),
        ),
        publisher=make_publisher(settings.broker_url),
        auth_cache=TtlCache(settings.auth_cache_seconds),
    )


def _wake_dispatcher_after_commit(services: Services, dispatcher: Dispatcher) -> None:
    """Publish new outbox rows right after their transaction commits, not at the next poll."""

    @event.listens_for(services.session_factory, "after_flush")
    def _note_flushed(session: Session, _ctx: object) -> None:
        if any(isinstance(obj, OutboxMessage) for obj in session.new):
            session.info["outbox_dirty"] = True

    @event.listens_for(services.session_factory, "after_commit")
    def _wake(session: Session) -> None:
        if session.info.pop("outbox_dirty", False):
            dispatcher.wake()


def create_app(settings: APISettings | None = None) -> FastAPI:
    """Build the app; settings are read from the environment when not given."""
    resolved = settings or APISettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(resolved.log_level, resolved.json_logs)
        services = build_services(resolved)
        app.state.services = services
        dispatcher = None
        if resolved.dispatcher_enabled:
            dispatcher = Dispatcher(
                services.session_factory, services.publisher, resolved.dispatcher_poll_seconds
            )
            _wake_dispatcher_after_commit(services, dispatcher)
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            services.engine.dispose()

    app = FastAPI(
        title="loraplex",
        version="0.1.0",
        description="OpenAI-compatible fine-tuning API: files, fine-tuning jobs and models.",
        lifespan=lifespan,
        # "/v1/files/" is a 404 like any unknown URL, not a redirect: behind a TLS proxy the
        # redirect would point to http://, and clients differ on replaying a POST.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    for router in (files_router, jobs_router, models_router, webhooks_router, ops_router):
        app.include_router(router)
    app.include_router(admin_router)  # /admin: HTML pages, not in the OpenAPI document
    app.add_middleware(
        RequestLimitsMiddleware,
        json_limit=resolved.max_json_body_bytes,
        upload_limit=resolved.max_file_bytes + _FORM_OVERHEAD,
    )
    app.add_middleware(RequestContextMiddleware)
    return app
