"""The gateway's ASGI application: a few routes on plain Starlette (no per-request validation
layer on the hot path) and the background loops that keep its view of the fleet current."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
from anyio import to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api.catalog.service import list_models
from api.errors import error_body
from common.internal_auth import REPLICAS_REQUEST, verify
from common.logging import configure_logging
from common.storage import storage_from_url
from models_db.base import now_ts
from models_db.session import make_engine, make_session_factory
from serving.adapters import AdapterCache, AdapterPlacer, AdapterRef
from serving.errors import GatewayError
from serving.gateway import Gateway, until_disconnect
from serving.ratelimit import LocalRateLimiter, RateLimiter, SyncedRateLimiter
from serving.replicas import ReplicaPool
from serving.settings import GatewaySettings
from serving.upstream import CallerLeft, UpstreamPool
from serving.usage import UsageMeter

log = logging.getLogger(__name__)

ANY_SCOPE = frozenset({"inference", "finetune", "admin"})


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def models(request: Request) -> Response:
    gateway = _gateway(request)
    try:
        principal = await gateway.principal(request, ANY_SCOPE)
    except GatewayError as exc:
        return exc.response()

    def load() -> list[dict[str, object]]:
        with gateway.session_factory() as session:
            return [m.model_dump() for m in list_models(session, principal)]

    return JSONResponse({"object": "list", "data": await to_thread.run_sync(load)})


def _not_found() -> Response:
    # Indistinguishable from an unknown path for anyone without the server secret.
    return JSONResponse(
        error_body("Unknown endpoint.", "invalid_request_error", None, "unknown_url"), 404
    )


async def parity(request: Request) -> Response:
    """Internal: answer a prompt greedily with a just-published adapter (signed by a worker)."""
    gateway = _gateway(request)
    body = await request.body()
    if not verify(gateway.settings.secret_key, body, dict(request.headers)):
        return _not_found()
    try:
        payload = json.loads(body)
        adapter = AdapterRef(**payload["adapter"])
        messages, max_tokens = payload["messages"], int(payload["max_tokens"])
    except (ValueError, KeyError, TypeError) as exc:
        return GatewayError(400, f"bad parity request: {exc}").response()
    try:
        text, token_ids = await gateway.parity_answer(adapter, messages, max_tokens)
    except GatewayError as exc:
        return exc.response()
    return JSONResponse({"text": text, "token_ids": token_ids})


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready: the database answers and a replica is healthy. Only counts: in embedded mode this
    port is the public one, and the replicas' adapters are other tenants' model names."""
    gateway = _gateway(request)

    def database() -> str:
        try:
            with gateway.session_factory() as session:
                session.execute(text("SELECT 1"))
            return "ok"
        except Exception as exc:  # noqa: BLE001 - report any failure as not ready
            return f"error: {type(exc).__name__}"

    replicas = gateway.pool.replicas
    healthy = sum(1 for r in replicas if r.healthy)
    checks = {
        "database": await to_thread.run_sync(database),
        "replicas": f"{healthy} of {len(replicas)} healthy",
    }
    ready = checks["database"] == "ok" and healthy > 0
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


async def replicas(request: Request) -> Response:
    """Internal, for the operators' dashboard (signed with the server secret): each replica's
    health, base model, in-flight requests and loaded adapters."""
    gateway = _gateway(request)
    if not verify(gateway.settings.secret_key, REPLICAS_REQUEST, dict(request.headers)):
        return _not_found()
    return JSONResponse(
        {
            "replicas": {
                r.url: {
                    "healthy": r.healthy,
                    "base_model": r.base_model,
                    "adapters": list(r.adapters),
                    "inflight": r.inflight,
                    "error": r.last_error,
                }
                for r in gateway.pool.replicas
            }
        }
    )


async def metrics(_request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message, code = "Unknown endpoint.", "unknown_url"
    elif exc.status_code == 405:
        message, code = "Method not allowed for this endpoint.", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return JSONResponse(
        error_body(message, "invalid_request_error", None, code), status_code=exc.status_code
    )


async def _watch_models(gateway: Gateway, interval: float) -> None:
    """Unload models retired through the API from every replica and the local cache, and forget
    every model resolution that a retirement or a change of base model made wrong; while this
    reports, the gateway trusts its model resolutions for longer (serving/cache.py)."""
    # The first poll looks back a day: retirements while no gateway ran are unloaded too.
    since, handled = now_ts() - 86_400, set[str]()
    bases: dict[str, tuple[bool, int]] | None = None
    # Unloading waits for each replica's admin lock (held through adapter loads) and for the
    # replica itself: it runs beside the watch, which must keep forgetting and reporting.
    unloading: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                started, polled = now_ts(), time.monotonic()
                retired = await to_thread.run_sync(gateway.catalog.retired_since, since)
                for name, tenant_id in retired:
                    # Forgotten at every poll of the overlap: a resolution loaded while the
                    # model was being retired would otherwise outlive it.
                    gateway.models.forget((tenant_id, name))
                current = await to_thread.run_sync(gateway.catalog.base_models)
                if bases is not None and current != bases:
                    gateway.models.forget_where(
                        partial(_uses_changed_base, _changed(bases, current))
                    )
                bases = current
                gateway.models.watched(polled, valid_for=2 * interval)
                since = started - 60  # overlap: rows retired during the query are seen next time
                names = {name for name, _ in retired}
                handled &= names  # only the overlap window's retirements can come back
                for name in names - handled:
                    handled.add(name)
                    task = asyncio.create_task(_unload_retired(gateway, name, handled))
                    unloading.add(task)
                    task.add_done_callback(unloading.discard)
            except Exception:
                log.exception("looking for retired models failed")
            await asyncio.sleep(interval)
    finally:
        for task in unloading:
            task.cancel()


async def _unload_retired(gateway: Gateway, name: str, handled: set[str]) -> None:
    try:
        await gateway.placer.retire(name)
    except Exception:
        log.exception("unloading retired model %s failed", name)
        handled.discard(name)  # tried again at the next poll of the overlap


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def _uses_changed_base(changed: set[str], key: Any, model: Any) -> bool:
    """A (tenant, name) resolution that a changed base model may have made wrong."""
    return bool(key[1] in changed or (model is not None and model.base_model in changed))


class GatewayApp:
    """The gateway's ASGI entry: the two inference routes go straight to their handler; the
    rest (and the lifespan) to the Starlette application.

    Starlette's routing, its two middlewares and the per-route exception wrapper each cost a
    little per request and per streamed chunk, which on the hot path is the gateway's whole
    budget; nothing on these two routes needs them.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.router = app.router  # CombinedApp runs each application's lifespan through it
        self._hot = {
            "/v1/chat/completions": "chat/completions",
            "/v1/completions": "completions",
        }

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._hot.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            error = error_body(
                "Method not allowed for this endpoint.",
                "invalid_request_error",
                None,
                "method_not_allowed",
            )
            await JSONResponse(error, 405, headers={"allow": "POST"})(scope, receive, send)
            return
        gateway: Gateway = self.app.state.gateway
        caller_left: asyncio.Task[None] | None = None
        try:
            call = await gateway.prepare(Request(scope, receive), endpoint)
            # The body is read: from here the only message left is the disconnect, which
            # aborts the upstream answer (vLLM stops generating for nobody).
            caller_left = asyncio.get_running_loop().create_task(until_disconnect(receive))
            call.caller_left = caller_left
            response = await gateway.forward(call)
        except GatewayError as exc:
            response = exc.response()
        except (ClientDisconnect, CallerLeft):
            if caller_left is not None:
                caller_left.cancel()
            return  # left while sending the request or waiting for the answer: nobody to answer
        except Exception:
            log.exception("inference request failed")
            response = JSONResponse(
                error_body(
                    "The server had an error while processing your request.",
                    "server_error",
                    None,
                    None,
                ),
                status_code=500,
            )
        try:
            await response(scope, receive, send)
        finally:
            if caller_left is not None:
                caller_left.cancel()


async def _watch_revocations(gateway: Gateway, interval: float) -> None:
    """Forget API keys revoked (or of tenants disabled) through the API, every ``interval``:
    one query for all keys, instead of reloading each cached key that often."""
    since = now_ts() - 60
    while True:
        try:
            started, polled = now_ts(), time.monotonic()
            for key_hash in await to_thread.run_sync(gateway.catalog.revoked_keys_since, since):
                gateway.auth_cache.forget(key_hash)
            gateway.auth_cache.watched(polled, valid_for=2 * interval)
            # Overlap: a key whose load was in flight while it was revoked is forgotten again at
            # the next polls; timestamps are whole seconds written by other hosts' clocks.
            since = started - 60
        except Exception:
            log.exception("looking for revoked keys failed")
        await asyncio.sleep(interval)


def create_gateway_app(settings: GatewaySettings | None = None) -> GatewayApp:
    resolved = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_logging(resolved.log_level, resolved.json_logs)
        resolved.ensure_data_dir()
        engine = make_engine(
            resolved.database_url,
            pool_size=10,
            max_overflow=50,
            lock_timeout_ms=5000,
            pre_ping=False,
        )
        session_factory = make_session_factory(engine)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(resolved.upstream_timeout_seconds, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        )
        headers = (
            {"authorization": f"Bearer {resolved.vllm_api_key}"} if resolved.vllm_api_key else {}
        )
        pool = ReplicaPool(resolved.replica_urls, client, headers)
        storage = storage_from_url(
            resolved.storage_url,
            s3_endpoint_url=resolved.s3_endpoint_url,
            base_dir=str(resolved.data_dir),
        )
        cache = AdapterCache(storage, resolved.cache_dir, resolved.adapter_cache_bytes)
        placer = AdapterPlacer(pool, cache, client, headers, resolved.replica_max_adapters)
        limiter: RateLimiter = (
            SyncedRateLimiter(resolved.rate_limit_redis_url)
            if resolved.rate_limit_redis_url
            else LocalRateLimiter()
        )
        meter = UsageMeter(session_factory)
        upstream = UpstreamPool(read_timeout=resolved.upstream_timeout_seconds)
        gateway = Gateway(resolved, session_factory, upstream, pool, cache, placer, limiter, meter)
        app.state.gateway = gateway
        await pool.check_all()
        loops = [
            asyncio.create_task(pool.run_health_checks(resolved.health_interval_seconds)),
            asyncio.create_task(meter.run(resolved.usage_flush_seconds)),
            asyncio.create_task(_watch_models(gateway, resolved.retired_poll_seconds)),
            asyncio.create_task(_watch_revocations(gateway, resolved.auth_cache_seconds)),
        ]
        if isinstance(limiter, SyncedRateLimiter):
            loops.append(asyncio.create_task(limiter.run()))
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
            for loop in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
            await gateway.finish_billing(timeout=10.0)
            await to_thread.run_sync(meter.flush)
            await client.aclose()
            await upstream.aclose()
            if isinstance(limiter, SyncedRateLimiter):
                await limiter.close()
            engine.dispose()

    routes = [
        # The inference routes are answered by GatewayApp before Starlette.
        Route("/v1/models", models, methods=["GET"]),
        Route("/internal/parity", parity, methods=["POST"]),
        Route("/internal/replicas", replicas, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    starlette = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    starlette.router.redirect_slashes = False  # as the API (ADR 0012): "/v1/models/" is a 404
    return GatewayApp(starlette)
