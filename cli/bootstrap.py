"""First-start setup for embedded mode: migrate, build and register the tiny model, a tenant."""

from __future__ import annotations

from api.settings import APISettings

TINY_MODEL_NAME = "tiny-llama"
DEMO_TENANT_SLUG = "demo"


def bootstrap_embedded(settings: APISettings) -> str | None:
    """Make a fresh embedded install usable; returns the demo tenant's new key, if created."""
    import migrations
    from api.catalog.repository import BaseModelRepository
    from api.catalog.service import register_base_model
    from api.tenancy.repository import TenantRepository
    from api.tenancy.service import create_api_key, create_tenant
    from models_db.session import make_engine, make_session_factory, transaction

    settings.ensure_data_dir()
    migrations.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    secret = None
    try:
        with transaction(factory) as session:
            if BaseModelRepository(session).get(TINY_MODEL_NAME) is None:
                from workers.training.tiny_model import build_tiny_model

                folder = build_tiny_model(settings.data_dir / "models" / TINY_MODEL_NAME)
                register_base_model(session, TINY_MODEL_NAME, str(folder))
            if TenantRepository(session).get_by_slug_or_id(DEMO_TENANT_SLUG) is None:
                tenant = create_tenant(session, "Demo", DEMO_TENANT_SLUG)
                secret = create_api_key(session, settings.secret_key, tenant, name="demo").secret
    finally:
        engine.dispose()
    return secret
