"""Recognise an example's format from its keys, and check one example of each format.

Every format refuses keys it does not know, so a misspelt field (``"mesages"``,
``"ouput"``) is reported instead of being silently ignored and trained without.
"""

from __future__ import annotations

import json
from typing import Any

from common.datasets.base import DatasetFormat
from common.datasets.chat import check_keys, check_message, check_messages, check_tools
from common.datasets.errors import ErrorCode, RecordError, json_type, show

CHAT_KEYS = ("messages", "tools", "parallel_tool_calls", "metadata")
DPO_KEYS = ("input", "preferred_output", "non_preferred_output", "metadata")
DPO_INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
ALPACA_KEYS = ("instruction", "input", "output", "system", "history")
SHAREGPT_KEYS = ("conversations", "system", "tools")
SHAREGPT_TURN_KEYS = ("from", "value")
SHAREGPT_ROLES = ("human", "gpt", "system", "observation", "function_call")
# After the optional system turn, turns alternate between these two sides.
PROMPT_SIDE = ("human", "observation")
REPLY_SIDE = ("gpt", "function_call")


def detect_format(obj: dict[str, Any]) -> DatasetFormat | None:
    """The format an example's keys point to, or None when they point nowhere."""
    if "messages" in obj:
        return DatasetFormat.CHAT
    if (
        "preferred_output" in obj
        or "non_preferred_output" in obj
        or isinstance(obj.get("input"), dict)
    ):
        return DatasetFormat.DPO
    if "conversations" in obj:
        return DatasetFormat.SHAREGPT
    if "instruction" in obj or "output" in obj:
        return DatasetFormat.ALPACA
    return None


def check_record(fmt: DatasetFormat, obj: dict[str, Any]) -> bool:
    """Check one example; return whether it has anything to train on.

    Raises RecordError with the problem (without the line; the caller knows that).
    """
    if fmt is DatasetFormat.CHAT:
        return check_chat(obj)
    if fmt is DatasetFormat.DPO:
        check_dpo(obj)
    elif fmt is DatasetFormat.ALPACA:
        check_alpaca(obj)
    else:
        check_sharegpt(obj)
    return True


def check_chat(obj: dict[str, Any]) -> bool:
    if "messages" not in obj:
        raise RecordError(
            ErrorCode.MISSING_MESSAGES,
            "missing 'messages'; each example must be an object with a 'messages' array",
        )
    check_keys(obj, CHAT_KEYS, "the example")
    roles, trained = check_messages(obj["messages"], "messages", allow_weight=True)
    if "assistant" not in roles:
        raise RecordError(
            ErrorCode.MISSING_ASSISTANT_MESSAGE,
            "no assistant message in 'messages'; each example needs at least one "
            "assistant message to learn from",
        )
    check_tools(obj)
    _check_metadata(obj)
    return trained


def check_dpo(obj: dict[str, Any]) -> None:
    check_keys(obj, DPO_KEYS, "the example")
    if "input" not in obj:
        raise _dpo(
            "missing 'input'; a preference example needs 'input', "
            "'preferred_output' and 'non_preferred_output'"
        )
    prompt = obj["input"]
    if not isinstance(prompt, dict):
        raise _dpo(f"'input' must be an object with a 'messages' array, got {json_type(prompt)}")
    check_keys(prompt, DPO_INPUT_KEYS, "'input'")
    if "messages" not in prompt:
        raise RecordError(ErrorCode.MISSING_MESSAGES, "missing 'input.messages'")
    roles, _ = check_messages(prompt["messages"], "input.messages", allow_weight=False)
    if "user" not in roles:
        raise _dpo("'input.messages' has no user message; the prompt needs at least one")
    if roles[-1] == "assistant":
        raise _dpo(
            "'input.messages' ends with an assistant message; the input must end with "
            "the turn the preferred and non-preferred outputs answer"
        )
    check_tools(prompt, "input.")
    for key in ("preferred_output", "non_preferred_output"):
        _check_dpo_output(obj, key)
    _check_metadata(obj)


def _check_dpo_output(obj: dict[str, Any], key: str) -> None:
    if key not in obj:
        raise _dpo(
            f"missing '{key}'; a preference example needs 'input', "
            "'preferred_output' and 'non_preferred_output'"
        )
    output = obj[key]
    if not isinstance(output, list):
        raise _dpo(
            f"'{key}' must be an array holding one assistant message, got {json_type(output)}"
        )
    if len(output) != 1:
        raise _dpo(f"'{key}' must contain exactly one message, found {len(output)}")
    message = output[0]
    role = message.get("role") if isinstance(message, dict) else None
    if role != "assistant":
        raise _dpo(f"{key}[0] has role {show(role)}; the output must be one assistant message")
    check_message(message, f"{key}[0]", allow_weight=False)


def _dpo(detail: str) -> RecordError:
    return RecordError(ErrorCode.INVALID_DPO_EXAMPLE, detail)


def check_alpaca(obj: dict[str, Any]) -> None:
    check_keys(obj, ALPACA_KEYS, "the example")
    for key in ("instruction", "output"):
        if key not in obj:
            raise _alpaca(
                f"missing '{key}'; an alpaca example needs 'instruction' and "
                "'output' ('input', 'system' and 'history' are optional)"
            )
    for key in ("instruction", "input", "output", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise _alpaca(f"'{key}' must be a string, got {json_type(obj[key])}")
    if not obj["output"]:
        raise _alpaca("'output' is empty; it is the answer the model learns")
    if not obj["instruction"] and not obj.get("input"):
        raise _alpaca("'instruction' and 'input' are both empty; the prompt needs text")
    history = obj.get("history", [])
    if not isinstance(history, list):
        raise _alpaca(
            f"'history' must be an array of [question, answer] pairs, got {json_type(history)}"
        )
    for i, pair in enumerate(history):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(text, str) for text in pair)
        ):
            raise _alpaca(f"history[{i}] must be a [question, answer] pair of strings")


def _alpaca(detail: str) -> RecordError:
    return RecordError(ErrorCode.INVALID_ALPACA_EXAMPLE, detail)


def check_sharegpt(obj: dict[str, Any]) -> None:
    check_keys(obj, SHAREGPT_KEYS, "the example")
    if "conversations" not in obj:
        raise _sharegpt(
            "missing 'conversations'; a sharegpt example needs a "
            '\'conversations\' array of {"from", "value"} turns'
        )
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _sharegpt("'conversations' must be a non-empty array of turns")
    if "system" in obj and not isinstance(obj["system"], str):
        raise _sharegpt(f"'system' must be a string, got {json_type(obj['system'])}")
    if "tools" in obj and not isinstance(obj["tools"], (str, list)):
        raise _sharegpt("'tools' must be a JSON string or an array of tool objects")
    sources = [_check_turn(turn, i) for i, turn in enumerate(turns)]
    start = 0
    if sources[0] == "system":
        if "system" in obj:
            raise _sharegpt(
                "the system prompt is given twice: as 'system' and as the first turn; keep one"
            )
        start = 1
    for i in range(start, len(sources)):
        expected = PROMPT_SIDE if (i - start) % 2 == 0 else REPLY_SIDE
        if sources[i] == "system":
            raise _sharegpt(
                f"conversations[{i}] is from 'system'; only the first turn may be a system turn"
            )
        if sources[i] not in expected:
            raise _sharegpt(
                f"conversations[{i}] is from {show(sources[i])} but a "
                f"{' or '.join(expected)} turn is expected here; turns must alternate "
                "human/observation and gpt/function_call, starting with human"
            )
        if sources[i] == "function_call":
            _check_function_call(turns[i]["value"], i)
    if "gpt" not in sources:
        raise RecordError(
            ErrorCode.MISSING_ASSISTANT_MESSAGE,
            "no 'gpt' turn in 'conversations'; each example needs at least one answer "
            "to learn from",
        )
    if (len(sources) - start) % 2:
        raise _sharegpt(
            f"'conversations' ends with a {show(sources[-1])} turn; it must "
            "end with a gpt or function_call turn"
        )


def _check_turn(turn: Any, i: int) -> str:
    where = f"conversations[{i}]"
    if not isinstance(turn, dict):
        raise _sharegpt(
            f'{where} must be an object like {{"from": "human", '
            f'"value": "..."}}, got {json_type(turn)}'
        )
    check_keys(turn, SHAREGPT_TURN_KEYS, where)
    source = turn.get("from")
    if not isinstance(source, str) or source not in SHAREGPT_ROLES:
        raise RecordError(
            ErrorCode.UNKNOWN_ROLE,
            f"unknown 'from' value {show(source)} in {where}; expected one of "
            f"{', '.join(SHAREGPT_ROLES)}",
        )
    value = turn.get("value")
    if not isinstance(value, str):
        raise _sharegpt(f"'value' of {where} must be a string, got {json_type(value)}")
    if not value and source in ("human", "gpt"):
        raise _sharegpt(f"'value' of {where} ({source}) is empty")
    return source


def _check_function_call(value: str, i: int) -> None:
    """A function_call turn holds a JSON {"name", "arguments"} call, or a list of them."""
    problem = (
        f"'value' of conversations[{i}] (function_call) must be a JSON string like "
        '{"name": "...", "arguments": {...}}'
    )
    try:
        call = json.loads(value)
    except (ValueError, RecursionError):
        raise _sharegpt(problem) from None
    calls = call if isinstance(call, list) else [call]
    if not calls:
        raise _sharegpt(problem)
    for one in calls:
        if (
            not isinstance(one, dict)
            or not isinstance(one.get("name"), str)
            or "arguments" not in one
        ):
            raise _sharegpt(problem)


def _sharegpt(detail: str) -> RecordError:
    return RecordError(ErrorCode.INVALID_SHAREGPT_EXAMPLE, detail)


def _check_metadata(obj: dict[str, Any]) -> None:
    if "metadata" in obj and not isinstance(obj["metadata"], dict):
        raise RecordError(
            ErrorCode.INVALID_METADATA,
            f"'metadata' must be an object, got {json_type(obj['metadata'])}",
        )
