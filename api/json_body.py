"""JSON request bodies, parsed as FastAPI parses them except that a key given twice in one
object is refused (common.strict_json, ADR 0012)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from api.errors import BadRequest
from common.strict_json import DuplicateKey, loads


class _RepeatedKey(HTTPException):
    # An HTTPException because FastAPI lets those out of its body parsing as they are; any
    # other exception would become its generic "error parsing the body".
    def __init__(self, found: DuplicateKey) -> None:
        super().__init__(400)
        self.found = found


def duplicate_key_error(found: DuplicateKey) -> BadRequest:
    message, param = found.describe()
    return BadRequest(message, param=param, code="duplicate_key")


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except DuplicateKey as found:
                raise _RepeatedKey(found) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """The route class of the public API's routers: a JSON body that repeats a key is a 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            try:
                return await handler(_StrictJSONRequest(request.scope, request.receive))
            except _RepeatedKey as exc:
                raise duplicate_key_error(exc.found) from None

        return strict
