"""JSON parsed as ``json.loads`` parses it, except that a key given twice in one object is
refused (ADR 0012): parsers disagree on which copy counts (Python's keeps the last), so a client
could not know which one we read, and a proxy that reads one copy while the server behind it
reads the other would check one value and forward another.

The check costs one dict build and a length comparison per object; only a body that fails it
is parsed a second time, to say where the duplicate is.
"""

from __future__ import annotations

import json
from typing import Any

from common.ids import show_id


class DuplicateKey(ValueError):
    def __init__(self, key: str = "", where: str = "") -> None:
        super().__init__(key, where)
        self.key = key
        self.where = where

    def describe(self) -> tuple[str, str]:
        """(message, param) for the 400: ``where`` is the object's path, "" for the top."""
        shown = show_id(self.key)
        return (
            f"Duplicate key {shown!r} in the JSON body{f' at {self.where}' if self.where else ''}: "
            "send each key once (parsers disagree on which copy counts).",
            f"{self.where}.{shown}" if self.where else shown,
        )


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKey()
    return obj


class _Pairs(list[tuple[str, Any]]):
    """An object as its key/value pairs in order, repeats kept (the slow path)."""


_DECODER = json.JSONDecoder(object_pairs_hook=_object_from_pairs)
_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs)


_MAX_WHERE = 200
"""Longest path reported (its end is kept): the error names a place, it does not echo a body."""


def _first_duplicate(value: Any, parts: list[str | int]) -> tuple[str, list[str | int]] | None:
    """(key, path parts of its object) for the first object that repeats a key, in the order a
    parser finishes objects (inner before outer), which is where the fast path stopped.

    ``parts`` is one list pushed and popped on the way down: the walk stays linear in the body's
    size however deep it nests (building a path string per level was quadratic).
    """
    if isinstance(value, _Pairs):
        for key, item in value:
            parts.append(key)
            found = _first_duplicate(item, parts)
            if found is not None:
                return found
            parts.pop()
        seen: set[str] = set()
        for key, _ in value:
            if key in seen:
                return key, list(parts)
            seen.add(key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            parts.append(index)
            found = _first_duplicate(item, parts)
            if found is not None:
                return found
            parts.pop()
    return None


def _path(parts: list[str | int]) -> str:
    """``a.b[0].c`` from its parts, each key cut by ``show_id`` and the whole to its end."""
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{show_id(part)}" if path else show_id(part)
    return path if len(path) <= _MAX_WHERE else "…" + path[-_MAX_WHERE:]


def loads(body: bytes) -> Any:
    """``json.loads(body)``, with the same encodings and errors, but a repeated key raises."""
    text = body.decode(json.detect_encoding(body), "surrogatepass")
    try:
        return _DECODER.decode(text)
    except DuplicateKey:
        pass
    # Parsed again in full, so that what follows the duplicate fails as json.loads would fail
    # on it (a syntax error is still a syntax error).
    found = _first_duplicate(_PAIRS_DECODER.decode(text), [])
    key, where = (found[0], _path(found[1])) if found is not None else ("", "")
    raise DuplicateKey(key, where)
