"""ASGI middleware: request ids, access logs, metrics and request body limits.

Written as plain ASGI (not BaseHTTPMiddleware) so they add microseconds, not milliseconds,
and never buffer a body.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from urllib.parse import parse_qsl

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from common.ids import show_id
from common.logging import request_id_var

log = logging.getLogger("loraplex.access")

REQUESTS = Counter("loraplex_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "loraplex_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class RequestContextMiddleware:
    """Assigns a request id (or keeps a sane incoming one), logs and measures each request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = (
            incoming
            if 0 < len(incoming) <= 64 and incoming.isprintable()
            else ("req_" + secrets.token_hex(12))
        )
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(scope["method"], route).observe(elapsed)
            if log.isEnabledFor(logging.INFO):  # off at WARNING: not even the record's fields
                log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "tenant_id": scope.get("state", {}).get("tenant_id"),
                    },
                )
            request_id_var.reset(token)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _repeated_query_parameter(query: bytes) -> tuple[str, str] | None:
    """(message, param) for the first name given twice in a query string, if one is.

    Which copy a framework keeps (FastAPI: the last) is a guess at what the client meant
    (ADR 0012); names are compared decoded, as the routes see them.
    """
    if b"&" not in query:
        return None
    names = [name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    seen: set[str] = set()
    for name in names:
        if name in seen and name:
            if name.startswith("metadata[") and name.endswith("]"):
                key = show_id(name[len("metadata[") : -1])
                return f"Metadata filter on '{key}' was given more than once.", "metadata"
            shown = show_id(name)
            return f"Query parameter '{shown}' was given more than once; send it once.", shown
        seen.add(name)
    return None


async def _answer_400(send: Send, message: str, param: str | None, code: str | None) -> None:
    payload = json.dumps(error_body(message, "invalid_request_error", param, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestLimitsMiddleware:
    """Refuses what no endpoint can mean: bodies over a limit (by Content-Length up front, or
    counted as they stream), NUL characters in the URL (no database can store them) and, on
    the JSON API (/v1), a query parameter given twice."""

    def __init__(self, app: ASGIApp, *, json_limit: int, upload_limit: int) -> None:
        self.app = app
        self.json_limit = json_limit
        self.upload_limit = upload_limit

    def _limit_for(self, scope: Scope) -> int:
        if scope["path"].rstrip("/") == "/v1/files" and scope["method"] == "POST":
            return self.upload_limit
        return self.json_limit

    async def _refuse(self, send: Send, limit: int, is_upload: bool) -> None:
        if is_upload:
            body = error_body(
                f"File is over the size limit of this service ({limit} bytes with form overhead).",
                "invalid_request_error",
                "file",
                "file_too_large",
            )
            status = 400
        else:
            body = error_body(
                f"Request body is over the limit of {limit} bytes.",
                "invalid_request_error",
                None,
                "request_too_large",
            )
            status = 413
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Control characters in a path name nothing, and a trailing newline would otherwise
        # match routes as if absent ("$" matches before it); NUL reaches no database.
        query = scope.get("query_string", b"")
        if _CONTROL.search(scope["path"]) or b"%00" in query:
            await _answer_400(
                send, "Control characters (NUL, newlines...) are not allowed in URLs.", None, None
            )
            return
        # The dashboard's pages are left alone: /v1 is the API whose clients this protects.
        repeated = _repeated_query_parameter(query) if scope["path"].startswith("/v1/") else None
        if repeated is not None:
            await _answer_400(send, *repeated, "duplicate_parameter")
            return
        limit = self._limit_for(scope)
        is_upload = limit == self.upload_limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(send, limit, is_upload)
            return
        seen = 0
        started = too_large = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large:
                # The app may have caught the exception and answered it its own way (FastAPI
                # reading a JSON body: 400 "error parsing the body"): the answer is ours.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(send, limit, is_upload)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send, limit, is_upload)


class _BodyTooLarge(Exception):
    pass
