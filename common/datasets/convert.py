"""Turn validated examples of any format into OpenAI-style messages for the trainer.

The output is one shape for every format: ``{"role", "content": str}`` plus ``"weight"``
(0 or 1) on every assistant message, and ``name``/``tool_calls``/``tool_call_id`` where the
source had them. ``developer`` becomes ``system``; text parts are joined into one string.
These functions trust their input: run the validator first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.datasets.base import DatasetFormat
from common.datasets.chat import content_text

Message = dict[str, Any]

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool"}


def to_chat_messages(fmt: DatasetFormat, record: Mapping[str, Any]) -> list[Message]:
    """The conversation of a chat, alpaca or sharegpt example, as weighted messages."""
    if fmt is DatasetFormat.CHAT:
        return [_normalise(message, weighted=True) for message in record["messages"]]
    if fmt is DatasetFormat.ALPACA:
        return _from_alpaca(record)
    if fmt is DatasetFormat.SHAREGPT:
        return _from_sharegpt(record)
    raise ValueError("a dpo example is a preference pair; use to_preference()")


def to_preference(record: Mapping[str, Any]) -> tuple[list[Message], Message, Message]:
    """A dpo example as (prompt messages, chosen reply, rejected reply)."""
    prompt = [_normalise(m, weighted=False) for m in record["input"]["messages"]]
    chosen = _normalise(record["preferred_output"][0], weighted=False)
    rejected = _normalise(record["non_preferred_output"][0], weighted=False)
    return prompt, chosen, rejected


def _normalise(message: Mapping[str, Any], *, weighted: bool) -> Message:
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content")
    out: Message = {
        "role": role,
        "content": "" if content is None else content_text(content, "message"),
    }
    if weighted and role == "assistant":
        out["weight"] = message.get("weight", 1)
    for key in ("name", "tool_calls", "tool_call_id"):
        if key in message:
            out[key] = message[key]
    return out


def _from_alpaca(record: Mapping[str, Any]) -> list[Message]:
    messages: list[Message] = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    # LLaMA-Factory trains on the history answers too (its mask_history is off by default).
    for question, answer in record.get("history", []):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer, "weight": 1})
    prompt = "\n".join(text for text in (record["instruction"], record.get("input")) if text)
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": record["output"], "weight": 1})
    return messages


def _from_sharegpt(record: Mapping[str, Any]) -> list[Message]:
    turns = list(record["conversations"])
    system = record.get("system")
    if turns[0]["from"] == "system":
        system = turns.pop(0)["value"]
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    call_ids: list[str] = []  # of the latest function_call turn
    calls_made = 0
    for turn in turns:
        source, value = turn["from"], turn["value"]
        if source == "function_call":
            calls = _tool_calls(value, first=calls_made)
            calls_made += len(calls)
            call_ids = [call["id"] for call in calls]
            messages.append({"role": "assistant", "content": "", "weight": 1, "tool_calls": calls})
            continue
        message: Message = {"role": _SHAREGPT_ROLES[source], "content": value}
        if source == "gpt":
            message["weight"] = 1
        elif source == "observation" and call_ids:
            message["tool_call_id"] = call_ids[0]
        messages.append(message)
    return messages


def _tool_calls(value: str, *, first: int) -> list[Message]:
    """LLaMA-Factory's ``{"name", "arguments"}`` (or a list of them) as OpenAI tool_calls."""
    parsed = json.loads(value)
    calls = parsed if isinstance(parsed, list) else [parsed]
    out: list[Message] = []
    for n, call in enumerate(calls, start=first):
        arguments = call["arguments"]
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.append(
            {
                "id": f"call_{n}",
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    return out


def parity_prompt(fmt: DatasetFormat, record: Mapping[str, Any]) -> list[Message] | None:
    """The prompt of an example (the conversation before its last assistant reply), as plain
    role/content messages: what the train/serve parity check sends to both sides. None for
    examples this check does not cover (tool calls)."""
    if fmt is DatasetFormat.DPO:
        messages = to_preference(record)[0]
    else:
        messages = to_chat_messages(fmt, record)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        messages = messages[:last]
    if not messages or any("tool_calls" in m or m["role"] == "tool" for m in messages):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]
