"""JSON request bodies, parsed as FastAPI parses them except that a key given twice in one
object is refused (ADR 0012): parsers disagree on which copy counts (Python's keeps the last),
so a client could not know which one we read.

The check costs one dict build and a length comparison per object; only a body that fails it
is parsed a second time, to say where the duplicate is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from api.errors import BadRequest
from common.ids import show_id


class _DuplicateKey(HTTPException):
    # An HTTPException because FastAPI lets those out of its body parsing as they are; any
    # other exception would become its generic "error parsing the body".
    def __init__(self, key: str = "", where: str = "") -> None:
        super().__init__(400)
        self.key = key
        self.where = where


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey()
    return obj


class _Pairs(list[tuple[str, Any]]):
    """An object as its key/value pairs in order, repeats kept (the slow path)."""


_DECODER = json.JSONDecoder(object_pairs_hook=_object_from_pairs)
_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs)


def _first_duplicate(value: Any, path: str) -> tuple[str, str] | None:
    """(key, path of its object) for the first object that repeats a key, in the order a
    parser finishes objects (inner before outer), which is where the fast path stopped."""
    if isinstance(value, _Pairs):
        for key, item in value:
            found = _first_duplicate(item, f"{path}.{show_id(key)}" if path else show_id(key))
            if found is not None:
                return found
        seen: set[str] = set()
        for key, _ in value:
            if key in seen:
                return key, path
            seen.add(key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_duplicate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def loads(body: bytes) -> Any:
    """``json.loads(body)``, with the same encodings and errors, but a repeated key raises."""
    text = body.decode(json.detect_encoding(body), "surrogatepass")
    try:
        return _DECODER.decode(text)
    except _DuplicateKey:
        pass
    # Parsed again in full, so that what follows the duplicate fails as json.loads would fail
    # on it (a syntax error is still a syntax error).
    found = _first_duplicate(_PAIRS_DECODER.decode(text), "")
    key, where = found if found is not None else ("", "")  # (the fast path saw one)
    raise _DuplicateKey(key, where)


def duplicate_key_error(key: str, where: str) -> BadRequest:
    """The 400 for a body that repeats ``key`` in the object at ``where`` ("" for the top)."""
    shown = show_id(key)
    return BadRequest(
        f"Duplicate key {shown!r} in the JSON body{f' at {where}' if where else ''}: "
        "send each key once (parsers disagree on which copy counts).",
        param=f"{where}.{shown}" if where else shown,
        code="duplicate_key",
    )


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """The route class of the public API's routers: a JSON body that repeats a key is a 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            try:
                return await handler(_StrictJSONRequest(request.scope, request.receive))
            except _DuplicateKey as exc:
                raise duplicate_key_error(exc.key, exc.where) from None

        return strict
