"""The API and the gateway behind one port (embedded mode), so one ``OpenAI(base_url=…)``
client reaches files, jobs, models and chat.

Inference paths go to the gateway; everything else (including ``/v1/models``) to the API. Both
applications' lifespans run, each with its own state.
"""

from __future__ import annotations

import contextlib
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

GATEWAY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/internal/parity"})


class CombinedApp:
    def __init__(self, api: Any, gateway: Any) -> None:
        self.api: ASGIApp = api
        self.gateway: ASGIApp = gateway
        self._apps = (api, gateway)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        target = self.gateway if scope.get("path") in GATEWAY_PATHS else self.api
        await target(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with contextlib.AsyncExitStack() as stack:
            try:
                for app in self._apps:
                    await stack.enter_async_context(app.router.lifespan_context(app))
            except BaseException as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                raise
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


def create_combined_app(api_settings: Any = None, gateway_settings: Any = None) -> CombinedApp:
    from api.app import create_app
    from serving.app import create_gateway_app

    return CombinedApp(create_app(api_settings), create_gateway_app(gateway_settings))
