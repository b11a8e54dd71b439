"""Every accepted format becomes the same weighted OpenAI-style messages for the trainer."""

from __future__ import annotations

import json

import pytest

from common.datasets import (
    DatasetFormat,
    iter_examples,
    to_chat_messages,
    to_preference,
)


def test_alpaca_with_system_and_history() -> None:
    record = {
        "system": "You are a calculator.",
        "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]],
        "instruction": "Now add these.",
        "input": "3 and 3",
        "output": "6",
    }
    assert to_chat_messages(DatasetFormat.ALPACA, record) == [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2", "weight": 1},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4", "weight": 1},
        {"role": "user", "content": "Now add these.\n3 and 3"},
        {"role": "assistant", "content": "6", "weight": 1},
    ]


def test_alpaca_without_optional_fields() -> None:
    record = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert to_chat_messages(DatasetFormat.ALPACA, record) == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!", "weight": 1},
    ]


def test_sharegpt_with_system_turn() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Bye!"},
        ]
    }
    assert to_chat_messages(DatasetFormat.SHAREGPT, record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "weight": 1},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!", "weight": 1},
    ]


def test_sharegpt_system_key_and_tool_turns() -> None:
    call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    record = {
        "system": "Use tools.",
        "conversations": [
            {"from": "human", "value": "1+2?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "3"},
        ],
    }
    messages = to_chat_messages(DatasetFormat.SHAREGPT, record)
    assert messages[0] == {"role": "system", "content": "Use tools."}
    assert messages[2] == {
        "role": "assistant",
        "content": "",
        "weight": 1,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
            }
        ],
    }
    assert messages[3] == {"role": "tool", "content": "3", "tool_call_id": "call_0"}
    assert messages[4] == {"role": "assistant", "content": "3", "weight": 1}


def test_chat_weights_are_preserved_and_roles_normalised() -> None:
    record = {
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": "Draft", "weight": 0},
            {"role": "user", "content": "Again", "name": "ada"},
            {"role": "assistant", "content": "Final"},
        ]
    }
    assert to_chat_messages(DatasetFormat.CHAT, record) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Draft", "weight": 0},
        {"role": "user", "content": "Again", "name": "ada"},
        {"role": "assistant", "content": "Final", "weight": 1},
    ]


def test_dpo_becomes_a_preference_pair() -> None:
    record = {
        "input": {"messages": [{"role": "user", "content": "Name a colour."}]},
        "preferred_output": [{"role": "assistant", "content": "Blue."}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }
    prompt, chosen, rejected = to_preference(record)
    assert prompt == [{"role": "user", "content": "Name a colour."}]
    assert chosen == {"role": "assistant", "content": "Blue."}
    assert rejected == {"role": "assistant", "content": "No."}
    with pytest.raises(ValueError):
        to_chat_messages(DatasetFormat.DPO, record)


def test_streamed_examples_convert_end_to_end() -> None:
    records = [{"instruction": f"Double {i}.", "output": str(2 * i)} for i in range(10)]
    data = json.dumps(records).encode()
    converted = [to_chat_messages(fmt, rec) for fmt, rec in iter_examples([data])]
    assert converted[3] == [
        {"role": "user", "content": "Double 3."},
        {"role": "assistant", "content": "6", "weight": 1},
    ]
