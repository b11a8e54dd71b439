"""The hot path: authenticate, resolve, admit, place the adapter, forward to vLLM, count usage.

The request body is parsed once to read the few fields the gateway acts on (``model``,
``stream``, ``max_tokens``...) and forwarded as the same bytes, except that a streaming request
gets ``stream_options.include_usage`` so usage can be counted (the extra final chunk is then
dropped before it reaches a client that did not ask for it). Responses are passed through
unchanged, byte for byte for streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
from prometheus_client import Counter, Histogram
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.errors import error_body
from api.tenancy import keys
from api.tenancy.service import Principal, authenticate
from common import strict_json
from common.ids import is_plausible_id
from common.storage import StorageError
from serving import unfinished
from serving.adapters import (
    AdapterCache,
    AdapterIntegrityError,
    AdapterLoadError,
    AdapterPlacer,
    AdapterRef,
    AdapterRefused,
)
from serving.cache import RefreshingCache
from serving.catalog import ModelCatalog, ResolvedModel
from serving.errors import GatewayError, bad_request, model_not_found, unavailable
from serving.ratelimit import Limits, RateLimiter, retry_after_header
from serving.replicas import NoReplica, Replica, ReplicaPool
from serving.settings import GatewaySettings
from serving.upstream import CallerLeft, UpstreamError, UpstreamPool, UpstreamResponse
from serving.usage import UsageMeter

log = logging.getLogger(__name__)

INFERENCE_SCOPES = frozenset({"inference", "admin"})
# The caller of internal requests (the parity check), which no tenant can be.
_SYSTEM = Principal(tenant_id="", tenant_slug="", key_id="", scopes=frozenset())
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}

REQUESTS = Counter(
    "loraplex_gateway_requests_total", "Inference requests by outcome.", ["endpoint", "status"]
)
UPSTREAM_SECONDS = Histogram(
    "loraplex_gateway_upstream_seconds", "Time to the replica's response headers."
)


@dataclass
class Call:
    """One inference request on its way through the gateway."""

    endpoint: str  # "chat/completions" or "completions"
    principal: Principal
    model: ResolvedModel
    limits: Limits
    body: bytes
    stream: bool
    strip_usage: bool  # we asked vLLM for the usage chunk; the client did not
    # Completes when the caller disconnects (GatewayApp watches); None for internal calls.
    caller_left: asyncio.Future[None] | None = None


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        session_factory: sessionmaker[Session],
        upstream: UpstreamPool,
        pool: ReplicaPool,
        cache: AdapterCache,
        placer: AdapterPlacer,
        limiter: RateLimiter,
        meter: UsageMeter,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.upstream = upstream
        self.pool = pool
        self.cache = cache
        self.placer = placer
        self.limiter = limiter
        self.meter = meter
        self.catalog = ModelCatalog(session_factory)
        # Revocation acts within 1 s (DESIGN): the revocation watch (serving/app.py) polls
        # every auth_cache_seconds and forgets revoked keys, so a verified key can be trusted
        # for a minute; should the watch stop reporting, entries fall back to 2 x 0.5 s.
        self.auth_cache: RefreshingCache[Principal] = RefreshingCache(
            settings.auth_cache_seconds, 2 * settings.auth_cache_seconds, watched_ttl=60.0
        )
        # Watched by the model watch (serving/app.py: retirements, base model changes).
        self.models: RefreshingCache[ResolvedModel] = RefreshingCache(
            settings.model_cache_seconds, 2 * settings.model_cache_seconds, watched_ttl=60.0
        )
        self.limits: RefreshingCache[Limits] = RefreshingCache(5.0, 60.0)
        self.upstream_headers = {"content-type": "application/json"}
        # Billing of unfinished requests (serving/unfinished.py), running after they ended.
        self._billing: set[asyncio.Task[None]] = set()
        if settings.vllm_api_key:
            self.upstream_headers["authorization"] = f"Bearer {settings.vllm_api_key}"

    # ---- the caller -----------------------------------------------------------------------

    async def principal(self, request: Request, accepted: frozenset[str]) -> Principal:
        try:
            token = keys.bearer_token(request.headers.getlist("authorization"))
        except keys.BadAuthorization as exc:
            raise GatewayError(401, str(exc), code=exc.code) from None
        found = None
        if keys.looks_like_key(token):
            key_hash = keys.hash_key(self.settings.secret_key, token)
            found = await self.auth_cache.get(key_hash, partial(self._authenticate, token))
        if found is None:
            raise GatewayError(401, keys.incorrect_key_message(token), code="invalid_api_key")
        if not found.scopes & accepted:
            raise GatewayError(
                403,
                "This API key does not have the scope needed for this request (needs one of: "
                f"{', '.join(sorted(accepted))}).",
                type_="permission_error",
                code="insufficient_scope",
            )
        request.state.tenant_id = found.tenant_id
        return found

    def _authenticate(self, token: str) -> Principal | None:
        with self.session_factory() as session:
            principal = authenticate(session, self.settings.secret_key, token)
            session.commit()
            return principal

    async def resolve(self, tenant_id: str, name: str) -> ResolvedModel:
        if not is_plausible_id(name):  # names nothing; not worth a cache entry (up to 2 MiB)
            raise model_not_found(name)
        model = await self.models.get(
            (tenant_id, name), partial(self.catalog.resolve, tenant_id, name)
        )
        if model is None:
            raise model_not_found(name)
        return model

    async def limits_of(self, tenant_id: str) -> Limits:
        limits = await self.limits.get(tenant_id, partial(self.catalog.tenant_limits, tenant_id))
        assert limits is not None
        return limits

    # ---- the request ----------------------------------------------------------------------

    async def prepare(self, request: Request, endpoint: str) -> Call:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise self._too_large()
        principal = await self.principal(request, INFERENCE_SCOPES)
        body = await self._read_body(request)
        try:
            # A key given twice is refused: the gateway must check the very values vLLM uses.
            payload = strict_json.loads(body)
        except strict_json.DuplicateKey as found:
            message, param = found.describe()
            raise bad_request(message, param=param, code="duplicate_key") from None
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            raise bad_request("We could not parse the JSON body of your request.") from None
        if not isinstance(payload, dict):
            raise bad_request("The request body must be a JSON object.")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            raise bad_request("you must provide a model parameter", param="model")
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean.", param="stream")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", param="stream_options")
        self._check_shape(endpoint, payload)
        model = await self.resolve(principal.tenant_id, name)
        cap = self._check_max_tokens(endpoint, payload, model)
        limits = await self.limits_of(principal.tenant_id)
        decision = await self.limiter.admit(principal.tenant_id, limits)
        if not decision.allowed:
            raise GatewayError(
                429,
                f"Rate limit reached for {decision.reason} on your organization; "
                f"try again in {decision.retry_after:.1f}s.",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"retry-after": retry_after_header(decision.retry_after)},
            )
        # Each tenant's prompts get their own blocks in vLLM's prefix cache: shared blocks would
        # let a tenant learn from time-to-first-token what others sent (the client's value, if
        # any, is overridden).
        fields: dict[str, Any] = {**cap, "cache_salt": self._cache_salt(principal.tenant_id)}
        strip_usage = False
        if stream and not (options is not None and options.get("include_usage") is True):
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            payload.update(fields)
            body = json.dumps(payload).encode()
            strip_usage = True
        else:
            body = _with_fields(body, payload, fields)
        return Call(endpoint, principal, model, limits, body, stream, strip_usage)

    def _cache_salt(self, tenant_id: str) -> str:
        return _cache_salt(self.settings.secret_key, tenant_id)

    def _too_large(self) -> GatewayError:
        return GatewayError(
            413,
            f"Request body is larger than the limit of {self.settings.max_body_bytes} bytes.",
            code="request_too_large",
        )

    async def _read_body(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _check_shape(endpoint: str, payload: dict[str, Any]) -> None:
        if endpoint == "chat/completions":
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise bad_request("'messages' must be a non-empty array.", param="messages")
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                    raise bad_request(
                        f"messages[{index}] must be an object with a 'role'.",
                        param=f"messages[{index}]",
                    )
        else:
            prompt = payload.get("prompt")
            if prompt is None or prompt == "" or prompt == []:
                raise bad_request("'prompt' is required.", param="prompt")

    async def parity_answer(
        self, adapter: AdapterRef, messages: list[dict[str, Any]], max_tokens: int
    ) -> tuple[str, list[int] | None]:
        """Greedy answer of ``adapter`` (published, not yet announced) through the serving path,
        as text and (where vLLM reports them) token ids.

        Used by the train/serve parity check: the same placement and vLLM call as a tenant's
        request, without a tenant.
        """
        body = json.dumps(
            {
                "model": adapter.name,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "return_token_ids": True,
            }
        ).encode()
        model = ResolvedModel(adapter.name, adapter.base_model, max_tokens, adapter)
        call = Call("chat/completions", _SYSTEM, model, Limits(0, 0), body, False, False)
        response = await self.forward(call, metered=False)
        if response.status_code != 200:
            raise unavailable(
                f"serving answered {response.status_code}: {bytes(response.body)[:300]!r}",
                "parity_generation_failed",
            )
        answer = json.loads(bytes(response.body))
        if not answer.get("choices"):
            raise unavailable(f"serving answered without choices: {answer!r:.300}", "parity_failed")
        choice = answer["choices"][0]
        ids = choice.get("token_ids")
        return choice["message"]["content"] or "", ids if isinstance(ids, list) else None

    def _check_max_tokens(
        self, endpoint: str, payload: dict[str, Any], model: ResolvedModel
    ) -> dict[str, int]:
        """Check the generation limits; returns the field to add when the request sets none
        (vLLM would generate up to the rest of the context, past ``max_tokens_limit``)."""
        for field in ("n", "best_of"):
            value = payload.get(field)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 1 <= value <= self.settings.max_choices
            ):
                raise bad_request(
                    f"'{field}' must be an integer from 1 to {self.settings.max_choices}.",
                    param=field,
                )
        ceiling = min(self.settings.max_tokens_limit, model.context_length)
        cap: dict[str, int] = {}
        unset = payload.get("max_tokens") is None and payload.get("max_completion_tokens") is None
        # (below the context length: vLLM itself stops there)
        if unset and ceiling < model.context_length:
            if endpoint == "chat/completions":
                cap = {"max_completion_tokens": ceiling}
            elif "max_tokens" in payload:  # an explicit null; absent means vLLM's 16
                cap = {"max_tokens": ceiling}
        for field in ("max_tokens", "max_completion_tokens"):
            value = payload.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_request(f"'{field}' must be a positive integer.", param=field)
            if value > ceiling:
                raise bad_request(
                    f"'{field}' is {value}, more than this model allows ({ceiling}: the "
                    f"smaller of the gateway limit and the context length of "
                    f"{model.base_model}).",
                    param=field,
                    code="max_tokens_too_large",
                )
        return cap

    # ---- forwarding ---------------------------------------------------------------------

    async def forward(self, call: Call, *, metered: bool = True) -> Response:
        tried: set[Replica] = set()
        reloaded = False
        while True:
            replica = self._choose(call, frozenset(tried))
            if call.model.adapter is not None:
                try:
                    await self._place(replica, call)
                except httpx.TransportError as exc:  # the replica, not the adapter
                    replica.mark_failed(f"loading {call.model.name}: {exc!r}")
                    log.warning("replica %s failed a load (%r); trying another", replica.url, exc)
                    tried.add(replica)
                    continue
            release = self._hold(replica, call.model.name)
            try:
                started = time.perf_counter()
                upstream = await self.upstream.post(
                    f"{replica.url}/v1/{call.endpoint}",
                    call.body,
                    self.upstream_headers,
                    abandon=call.caller_left,
                )
                UPSTREAM_SECONDS.observe(time.perf_counter() - started)
            except CallerLeft:
                release()
                self._bill_unfinished(call, completion_tokens=0)
                raise
            except UpstreamError as exc:
                release()
                replica.mark_failed(f"{type(exc).__name__}: {exc}")
                log.warning("replica %s failed (%s); trying another", replica.url, exc)
                tried.add(replica)
                continue
            except BaseException:
                release()
                raise
            if upstream.status_code == 404 and call.model.adapter is not None and not reloaded:
                # The replica lost the adapter (restarted, or unloaded behind our back): load
                # it again and retry once, unseen by the caller.
                await upstream.aclose()
                release()
                self.placer.forget_on(replica, call.model.name)
                reloaded = True
                continue
            return await self._respond(call, replica, upstream, release, started, metered=metered)

    def _hold(self, replica: Replica, adapter: str) -> Callable[[], None]:
        """Count a request in flight on ``replica`` (and its adapter); returns the release."""
        key = (replica.url, adapter)
        self.placer.busy[key] += 1
        replica.inflight += 1

        def release() -> None:
            replica.inflight -= 1
            self.placer.busy[key] -= 1
            if self.placer.busy[key] <= 0:
                del self.placer.busy[key]

        return release

    def _choose(self, call: Call, tried: frozenset[Replica]) -> Replica:
        try:
            return self.pool.choose(call.model.base_model, call.model.name, exclude=tried)
        except NoReplica:
            raise unavailable(
                f"No healthy vLLM replica serves {call.model.base_model} right now; "
                "try again shortly.",
                "model_unavailable",
            ) from None

    async def _place(self, replica: Replica, call: Call) -> None:
        assert call.model.adapter is not None
        try:
            await self.placer.ensure_loaded(replica, call.model.adapter)
        except AdapterIntegrityError:
            raise unavailable(
                f"The model '{call.model.name}' failed its integrity check (its stored files "
                "do not match what training published) and was not loaded. The operators "
                "have been alerted.",
                "adapter_integrity_error",
            ) from None
        except AdapterRefused as exc:
            # This adapter's problem (a rank above the replica's maximum, say): the replica
            # stays in routing for everyone else.
            log.error("%s", exc)
            raise unavailable(
                f"The model '{call.model.name}' could not be loaded by the serving fleet; the "
                "operators have been alerted.",
                "adapter_load_failed",
            ) from exc
        except httpx.TransportError:
            raise  # the replica is unreachable: forward() tries another
        except (AdapterLoadError, httpx.HTTPError) as exc:
            replica.mark_failed(str(exc))
            raise unavailable(
                f"The model '{call.model.name}' could not be loaded right now; try again.",
                "adapter_load_failed",
            ) from exc
        except (StorageError, OSError) as exc:
            # Object storage or the local disk, not the replica.
            log.error("fetching adapter %s failed: %r", call.model.name, exc)
            raise unavailable(
                f"The model '{call.model.name}' is unavailable right now; try again shortly.",
                "adapter_unavailable",
            ) from exc

    async def _respond(
        self,
        call: Call,
        replica: Replica,
        upstream: UpstreamResponse,
        release: Callable[[], None],
        started: float,
        *,
        metered: bool = True,
    ) -> Response:
        headers = {k: v for k, v in upstream.headers if k.lower() not in _HOP_HEADERS}
        REQUESTS.labels(call.endpoint, str(upstream.status_code)).inc()
        if not call.stream or upstream.status_code != 200:
            try:
                content = await upstream.aread()
            except CallerLeft:
                if metered:
                    self._bill_unfinished(call, completion_tokens=0)
                raise
            except UpstreamError as exc:
                raise GatewayError(
                    502,
                    "The model's server failed while answering; try again.",
                    type_="server_error",
                    code="upstream_failed",
                ) from exc
            finally:
                await upstream.aclose()
                release()
            # The replica's share of the answer (request written to body read), so a caller
            # or a benchmark can tell the gateway's own time from the model's (W3C
            # Server-Timing; a stream's headers leave before its body, so only JSON answers).
            upstream_ms = (time.perf_counter() - started) * 1000
            if upstream.status_code != 200:
                content, headers = _as_openai_error(upstream.status_code, content, headers)
            elif metered:
                self._count(call, _usage_of(content))
            headers["server-timing"] = f"upstream;dur={upstream_ms:.3f}"
            return Response(content, status_code=upstream.status_code, headers=headers)

        return RelayResponse(
            headers,
            self._relay(call, upstream),
            upstream,
            release,
            replica.mark_failed,
            send_timeout=self.settings.upstream_timeout_seconds,
        )

    async def _relay(self, call: Call, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
        """Pass SSE events through; take usage from the final chunk (dropped if we added it).

        A stream that ends before that chunk (the caller left, the replica broke off) is billed
        from the events relayed (serving/unfinished.py)."""
        pending = b""
        usage: dict[str, Any] | None = None
        relayed = 0
        try:
            async for chunk in upstream.aiter_raw():
                pending += chunk
                if b"\n\n" not in pending:
                    continue
                complete, _, pending = pending.rpartition(b"\n\n")
                out = []
                for event in complete.split(b"\n\n"):
                    if b'"usage":{' in event and b'"choices":[]' in event:
                        usage = _usage_of(event.partition(b"data: ")[2]) or usage
                        if call.strip_usage:
                            continue
                    out.append(event)
                if out:
                    relayed += len(out)
                    yield b"\n\n".join(out) + b"\n\n"
            if pending:
                yield pending
        finally:
            if usage is not None:
                self._count(call, usage)
            else:
                self._bill_unfinished(call, unfinished.streamed_tokens(call.endpoint, relayed))

    def _count(self, call: Call, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        self.meter.add(call.principal.tenant_id, call.model.name, prompt, completion)
        self.limiter.charge_tokens(call.principal.tenant_id, call.limits, prompt + completion)

    async def finish_billing(self, timeout: float) -> None:
        """Wait (at shutdown) for unfinished requests still being billed."""
        if self._billing:
            await asyncio.wait(set(self._billing), timeout=timeout)

    def _bill_unfinished(self, call: Call, completion_tokens: int) -> None:
        """Bill a request that ended without vLLM's usage report, once its prompt is counted."""
        task = asyncio.get_running_loop().create_task(
            self._bill_unfinished_later(call, completion_tokens)
        )
        self._billing.add(task)
        task.add_done_callback(self._billing.discard)

    async def _bill_unfinished_later(self, call: Call, completion_tokens: int) -> None:
        try:
            prompt = await self._prompt_tokens(call)
        except (UpstreamError, NoReplica, ValueError, KeyError, TypeError) as exc:
            prompt = unfinished.estimate(call.body)
            log.warning(
                "counting the prompt of an unfinished request to %s failed (%s); billing an "
                "estimate of %d tokens",
                call.model.name,
                exc,
                prompt,
            )
        usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens}
        self._count(call, usage)

    async def _prompt_tokens(self, call: Call) -> int:
        """The prompt's tokens as a replica of its base model counts them (vLLM's /tokenize)."""
        how = unfinished.prompt_count(call.endpoint, call.body, call.model.base_model)
        if how is None:
            return unfinished.estimate(call.body)
        total = how.known
        for request in how.requests:
            replica = self.pool.choose(call.model.base_model, call.model.base_model)
            answer = await self.upstream.post(
                f"{replica.url}/tokenize", json.dumps(request).encode(), self.upstream_headers
            )
            try:
                content = await answer.aread()
            finally:
                await answer.aclose()
            if answer.status_code != 200:
                raise UpstreamError(f"/tokenize answered {answer.status_code}: {content[:200]!r}")
            total += int(json.loads(content)["count"])
        return total


class RelayResponse(Response):
    """A streamed answer relayed from the replica to the caller as it arrives.

    Instead of Starlette's StreamingResponse (an anyio task group and a second task per answer,
    under uvicorn's ASGI 2.3, to notice a caller that left), it relies on the request's own
    watcher (``caller_left``, started by GatewayApp), which the upstream answer already
    watches: a caller leaving ends the relay with ``CallerLeft`` and makes vLLM stop
    generating. ``release`` runs when the answer is over, however it ends.
    """

    def __init__(
        self,
        headers: dict[str, str],
        chunks: AsyncIterator[bytes],
        upstream: UpstreamResponse,
        release: Callable[[], None],
        replica_failed: Callable[[str], None],
        *,
        send_timeout: float,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._chunks = chunks
        self._upstream = upstream
        self._release = release
        self._replica_failed = replica_failed
        self._send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        try:
            # A caller that stops reading (its socket buffer full, uvicorn waiting to drain)
            # must not hold the replica and its adapter forever: each piece gets as long to go
            # out as the replica gets to produce one.
            async with asyncio.timeout(None) as deadline:
                deadline.reschedule(loop.time() + self._send_timeout)
                start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                await send(start)
                deadline.reschedule(None)  # (the replica's pace is the upstream timeout's job)
                async for chunk in self._chunks:
                    deadline.reschedule(loop.time() + self._send_timeout)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    deadline.reschedule(None)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except CallerLeft:
            pass  # nobody is listening any more
        except TimeoutError:
            log.warning("a caller stopped reading its stream for %g s; closed", self._send_timeout)
        except UpstreamError as exc:
            # The replica broke off mid-answer. Headers are sent, so the caller learns it the
            # way OpenAI's streams say it (an error event, which the openai SDK raises).
            log.warning("a replica broke off a streamed answer: %s", exc)
            self._replica_failed(f"broke off a stream: {exc}")
            error = error_body(
                "The model's server failed while answering; try again.",
                "server_error",
                None,
                "upstream_failed",
            )
            event = b"data: " + json.dumps(error).encode() + b"\n\n"
            with contextlib.suppress(OSError):  # (the caller may be gone too)
                await send({"type": "http.response.body", "body": event, "more_body": False})
        finally:
            try:
                await self._chunks.aclose()  # type: ignore[attr-defined]  # an async generator
            finally:
                await self._upstream.aclose()
                self._release()  # whatever counting usage did: a leak skews routing for good


async def until_disconnect(receive: Receive) -> None:
    """Returns when the caller has gone away (to run as a task once the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@functools.lru_cache(maxsize=65_536)
def _cache_salt(secret_key: str, tenant_id: str) -> str:
    """A tenant's prefix-cache salt: stable, and unguessable without the server secret."""
    key = f"cache-salt:{tenant_id}".encode()
    return hmac.new(secret_key.encode(), key, hashlib.sha256).hexdigest()[:32]


def _with_fields(body: bytes, payload: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """``body`` (``payload`` as the client encoded it) with ``fields`` added as its last
    members, without re-encoding it where it is UTF-8. The client's body repeats no key
    (refused above), so the added members are the only copies: the client's own
    ``cache_salt``/``max_tokens`` are replaced, since vLLM keeps the last copy."""
    if not body.lstrip().startswith(b"{"):  # UTF-16/32, which json.loads also reads
        return json.dumps({**payload, **fields}).encode()
    end = body.rstrip().rindex(b"}")
    added = b"".join(b',"%s":%s' % (k.encode(), json.dumps(v).encode()) for k, v in fields.items())
    return body[:end] + added + body[end:]


def _usage_of(content: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _as_openai_error(
    status: int, content: bytes, headers: dict[str, str]
) -> tuple[bytes, dict[str, str]]:
    """vLLM's errors in OpenAI's shape ({"error": {...}}) whatever version produced them."""
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return content, headers
    message = parsed.get("message") if isinstance(parsed, dict) else None
    if not isinstance(message, str):
        message = content.decode(errors="replace")[:500] or f"upstream status {status}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    headers["content-type"] = "application/json"
    return json.dumps(error_body(message, kind, None, None)).encode(), headers
