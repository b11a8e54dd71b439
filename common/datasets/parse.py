"""Turn the bytes of one example into a Python value, strictly.

Stricter than ``json.loads`` on purpose, because the trainer and any other tool that reads the
file later must see exactly what was validated:

- the bytes must be UTF-8 (``json.loads`` would guess UTF-16/32 from bytes);
- NaN and Infinity are refused: they are not JSON and most other parsers reject them;
- a key repeated in one object is refused: parsers disagree on which copy wins;
- nesting deeper than ``MAX_NESTING`` is refused before parsing, so a line of 100 000 ``[``
  can never exhaust the stack;
- an escaped lone UTF-16 surrogate (``"\\ud800"``) is refused: the text could never be
  written back out as UTF-8.
"""

from __future__ import annotations

import json
import re
from typing import Any

from common.datasets.errors import DatasetError, ErrorCode, show
from common.datasets.splitter import MAX_NESTING, RawRecord, nesting_depth

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _ConstantError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise _ConstantError(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_object_from_pairs, parse_constant=_reject_constant)


def parse_record(raw: RawRecord) -> Any:
    """Parse one example's bytes, or raise a DatasetError naming its line."""
    where = raw.where()
    data = raw.data
    if b"\x00" in data:
        raise DatasetError(
            f"{where}: contains a NUL byte (0x00); the file looks binary or UTF-16 "
            "encoded, but it must be UTF-8 JSON text",
            ErrorCode.INVALID_JSON,
            raw.line,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{where}: not valid UTF-8 (byte 0x{data[err.start]:02x} at byte "
            f"{err.start + 1}); the file must be UTF-8 encoded",
            ErrorCode.INVALID_UTF8,
            raw.line,
        ) from None
    # Counting brackets is cheap; only a text with many of them is scanned properly.
    many = data.count(b"[") + data.count(b"{") > MAX_NESTING
    if many and nesting_depth(data) > MAX_NESTING:
        raise _invalid(raw, f"nested more than {MAX_NESTING} levels deep")
    try:
        value = _DECODER.decode(text)
    except _DuplicateKeyError as err:
        raise DatasetError(
            f"{where}: duplicate key {show(err.key)} in a JSON object; each key may "
            "appear only once",
            ErrorCode.DUPLICATE_KEY,
            raw.line,
        ) from None
    except _ConstantError as err:
        raise _invalid(raw, f"{err.name} is not a valid JSON value") from None
    except json.JSONDecodeError as err:
        if raw.index is None:
            position = f"column {err.colno}; each line must be one complete JSON object"
        else:
            position = f"line {raw.line + err.lineno - 1}, column {err.colno}"
        problem = err.msg.removesuffix(" at")  # "Invalid control character at"
        raise _invalid(raw, f"{problem} ({position})") from None
    except RecursionError:
        raise _invalid(raw, "nested too deeply") from None
    except ValueError:
        # The only other ValueError json raises: an integer too long to convert.
        raise _invalid(raw, "a number has too many digits") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise _invalid(raw, "a string contains an unpaired UTF-16 surrogate escape")
    return value


def _invalid(raw: RawRecord, problem: str) -> DatasetError:
    return DatasetError(f"{raw.where()}: invalid JSON: {problem}", ErrorCode.INVALID_JSON, raw.line)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False
