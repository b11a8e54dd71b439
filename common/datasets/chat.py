"""Checks for OpenAI-style messages, shared by the chat and the DPO formats.

Rules, following OpenAI's fine-tuning file validation:

- roles are ``system``, ``developer`` (treated like system), ``user``, ``assistant`` and
  ``tool``;
- ``content`` is a string or an array of ``{"type": "text", "text": ...}`` parts (images and
  audio cannot be trained on here); user and assistant content must not be empty or only
  whitespace, except that an assistant message that makes ``tool_calls`` may have no content;
- a tool call's ``arguments`` is a string holding JSON, as the model will be taught to write;
- ``weight`` (0 or 1, the integer, not ``true`` or ``"1"``) is allowed on assistant messages
  of supervised examples only; weight 0 means "context, do not learn this turn".
"""

from __future__ import annotations

import json
from typing import Any

from common.datasets.errors import ErrorCode, RecordError, json_type, show

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
_PART_KEYS = ("type", "text")
_NEEDS_TEXT = frozenset({"user", "assistant"})


def check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys outside ``allowed``: a typo must not silently drop data."""
    for key in obj:
        if key not in allowed:
            raise RecordError(
                ErrorCode.UNKNOWN_KEY,
                f"unknown key {show(key)} in {where}; expected only {', '.join(allowed)}",
            )


def content_text(content: Any, where: str) -> str:
    """The text of a message's content: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(
            ErrorCode.INVALID_CONTENT,
            f"the content of {where} must be a string or an array of text parts, "
            f"got {json_type(content)}",
        )
    texts = []
    for i, part in enumerate(content):
        part_where = f"{where}.content[{i}]"
        if not isinstance(part, dict):
            raise RecordError(
                ErrorCode.INVALID_CONTENT,
                f"{part_where} must be an object like "
                f'{{"type": "text", "text": "..."}}, got {json_type(part)}',
            )
        if part.get("type") != "text":
            raise RecordError(
                ErrorCode.INVALID_CONTENT,
                f"{part_where} has type {show(part.get('type'))}; only 'text' content "
                "parts are supported",
            )
        check_keys(part, _PART_KEYS, part_where)
        text = part.get("text")
        if not isinstance(text, str):
            raise RecordError(
                ErrorCode.INVALID_CONTENT,
                f"{part_where}.text must be a string, got {json_type(text)}",
            )
        texts.append(text)
    return "".join(texts)


def check_messages(messages: Any, path: str, *, allow_weight: bool) -> tuple[list[str], bool]:
    """Check a messages array; return its roles and whether any assistant turn is trained."""
    if not isinstance(messages, list):
        raise RecordError(
            ErrorCode.INVALID_MESSAGES,
            f"'{path}' must be an array of message objects, got {json_type(messages)}",
        )
    if not messages:
        raise RecordError(
            ErrorCode.MISSING_MESSAGES,
            f"'{path}' is empty; an example needs at least one message",
        )
    roles = []
    trained = False
    for i, message in enumerate(messages):
        role, weight = check_message(message, f"{path}[{i}]", allow_weight=allow_weight)
        roles.append(role)
        trained = trained or (role == "assistant" and weight == 1)
    return roles, trained


def check_message(message: Any, where: str, *, allow_weight: bool) -> tuple[str, int]:
    """Check one message; return its role and its weight (1 unless given)."""
    if not isinstance(message, dict):
        raise RecordError(
            ErrorCode.INVALID_MESSAGES,
            f"{where} must be a message object, got {json_type(message)}",
        )
    check_keys(message, _MESSAGE_KEYS, where)
    if "role" not in message:
        raise RecordError(
            ErrorCode.UNKNOWN_ROLE,
            f"{where} has no 'role'; expected one of {', '.join(ROLES)}",
        )
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise RecordError(
            ErrorCode.UNKNOWN_ROLE,
            f"unknown role {show(role)} in {where}; expected one of {', '.join(ROLES)}",
        )
    if "name" in message and not isinstance(message["name"], str):
        raise RecordError(
            ErrorCode.INVALID_MESSAGES,
            f"'name' of {where} must be a string, got {json_type(message['name'])}",
        )
    weight = _check_weight(message, role, where, allow_weight=allow_weight)
    has_tool_calls = _check_tool_fields(message, role, where)
    content = message.get("content")
    if content is None:
        if has_tool_calls:
            return role, weight
        state = "null" if "content" in message else "missing"
        raise RecordError(
            ErrorCode.MISSING_CONTENT,
            f"the content of {where} ({role}) is {state}; it must be a string",
        )
    text = content_text(content, where)
    if not text.strip() and role in _NEEDS_TEXT and not has_tool_calls:
        raise RecordError(
            ErrorCode.MISSING_CONTENT,
            f"the content of {where} ({role}) is {'empty' if not text else 'only whitespace'}",
        )
    return role, weight


def _check_weight(message: dict[str, Any], role: str, where: str, *, allow_weight: bool) -> int:
    if "weight" not in message:
        return 1
    if not allow_weight:
        raise RecordError(
            ErrorCode.INVALID_WEIGHT,
            f"{where} has a 'weight'; weights are only allowed in supervised chat examples",
        )
    if role != "assistant":
        raise RecordError(
            ErrorCode.INVALID_WEIGHT,
            f"{where} has a 'weight' but its role is {show(role)}; only assistant "
            "messages may carry a weight",
        )
    weight = message["weight"]
    # bool is an int in Python; JSON true is not a weight.
    if type(weight) is not int or weight not in (0, 1):
        raise RecordError(
            ErrorCode.INVALID_WEIGHT,
            f"invalid weight {show(weight)} in {where}; the weight must be 0 or 1",
        )
    return weight


def _check_tool_fields(message: dict[str, Any], role: str, where: str) -> bool:
    """Check tool_calls and tool_call_id; return whether the message makes tool calls."""
    if "tool_call_id" in message:
        if role != "tool":
            raise RecordError(
                ErrorCode.INVALID_MESSAGES,
                f"{where} has a 'tool_call_id' but only tool messages may have one",
            )
        if not isinstance(message["tool_call_id"], str):
            raise RecordError(
                ErrorCode.INVALID_MESSAGES,
                f"'tool_call_id' of {where} must be a string",
            )
    if "tool_calls" not in message:
        return False
    if role != "assistant":
        raise RecordError(
            ErrorCode.INVALID_MESSAGES,
            f"{where} has 'tool_calls' but only assistant messages may make tool calls",
        )
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise RecordError(
            ErrorCode.INVALID_MESSAGES,
            f"'tool_calls' of {where} must be a non-empty array",
        )
    for i, call in enumerate(calls):
        call_where = f"{where}.tool_calls[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id", ""), str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
            or not isinstance(function.get("arguments"), str)
        ):
            raise RecordError(
                ErrorCode.INVALID_MESSAGES,
                f'{call_where} must look like {{"id": ..., "type": "function", '
                '"function": {"name": "...", "arguments": "<JSON string>"}}',
            )
        try:
            json.loads(function["arguments"])
        except (ValueError, RecursionError):
            raise RecordError(
                ErrorCode.INVALID_MESSAGES,
                f"'{call_where}.function.arguments' is not valid JSON: "
                f"{show(function['arguments'])}",
            ) from None
    return True


def check_tools(obj: dict[str, Any], prefix: str = "") -> None:
    """Check the optional ``tools`` and ``parallel_tool_calls`` of an example."""
    if "tools" in obj:
        tools = obj["tools"]
        if not isinstance(tools, list):
            raise RecordError(
                ErrorCode.INVALID_TOOLS,
                f"'{prefix}tools' must be an array of tool objects, got {json_type(tools)}",
            )
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(tool, dict)
                or tool.get("type", "function") != "function"
                or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
            ):
                raise RecordError(
                    ErrorCode.INVALID_TOOLS,
                    f"'{prefix}tools[{i}]' must look like "
                    '{"type": "function", "function": {"name": "...", ...}}',
                )
    if "parallel_tool_calls" in obj and not isinstance(obj["parallel_tool_calls"], bool):
        raise RecordError(
            ErrorCode.INVALID_TOOLS,
            f"'{prefix}parallel_tool_calls' must be true or false",
        )
