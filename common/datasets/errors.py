"""The one exception a dataset check raises, and its error codes.

Messages follow OpenAI's fine-tuning file errors: they start with the line the problem is on
(``line 7: unknown role 'robot' in messages[1]; expected one of ...``) so a user can fix the
file without guessing. The codes are stable: the API returns them as ``error.code``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # The file as a whole.
    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    TOO_FEW_EXAMPLES = "too_few_examples"
    TOO_MANY_EXAMPLES = "too_many_examples"
    NO_TRAINABLE_EXAMPLES = "no_trainable_examples"
    UNRECOGNIZED_FORMAT = "unrecognized_format"
    MIXED_FORMATS = "mixed_formats"
    FORMAT_MISMATCH = "format_mismatch"
    ARRAY_NOT_SUPPORTED = "array_not_supported"
    # One line or array element, before its content is looked at.
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    LINE_TOO_LONG = "line_too_long"
    DUPLICATE_KEY = "duplicate_key"
    NOT_AN_OBJECT = "not_an_object"
    # The content of one example.
    UNKNOWN_KEY = "unknown_key"
    MISSING_MESSAGES = "missing_messages"
    INVALID_MESSAGES = "invalid_messages"
    UNKNOWN_ROLE = "unknown_role"
    MISSING_CONTENT = "missing_content"
    INVALID_CONTENT = "invalid_content"
    MISSING_ASSISTANT_MESSAGE = "missing_assistant_message"
    INVALID_WEIGHT = "invalid_weight"
    INVALID_TOOLS = "invalid_tools"
    INVALID_METADATA = "invalid_metadata"
    INVALID_DPO_EXAMPLE = "invalid_dpo_example"
    INVALID_ALPACA_EXAMPLE = "invalid_alpaca_example"
    INVALID_SHAREGPT_EXAMPLE = "invalid_sharegpt_example"


class DatasetError(ValueError):
    """A dataset is not acceptable: ``message`` says why, ``line`` (1-based) where."""

    def __init__(self, message: str, code: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.line = line

    def __reduce__(self) -> tuple[type[DatasetError], tuple[str, str, int | None]]:
        # Keeps code and line when the error crosses a process boundary.
        return (type(self), (self.message, self.code, self.line))

    def __repr__(self) -> str:
        return f"DatasetError({self.message!r}, code={self.code!r}, line={self.line!r})"


class RecordError(Exception):
    """A problem inside one example; the validator adds the line and makes a DatasetError.

    Kept apart from DatasetError so the per-format checks never need to know where the
    record came from (a JSONL line or an element of a JSON array).
    """

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


_SHOW_LIMIT = 40


def show(value: Any) -> str:
    """Quote a value from the upload for an error message, cut short and escaped.

    Uploaded keys and roles can be megabytes long or hold markup; the message must stay short
    and must never carry raw control characters.
    """
    if isinstance(value, str):
        text = value if len(value) <= _SHOW_LIMIT else value[:_SHOW_LIMIT] + "..."
        return repr(text)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= _SHOW_LIMIT else text[:_SHOW_LIMIT] + "..."
    kind = json_type(value)
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for 'expected X, got Y' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
