"""Small valid datasets in every accepted format, built in code."""

from __future__ import annotations

import json


def _jsonl(records: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def chat_jsonl(n: int = 12) -> bytes:
    return _jsonl(
        [
            {
                "messages": [
                    {"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{i + i}."},
                ]
            }
            for i in range(n)
        ]
    )


def dpo_jsonl(n: int = 12) -> bytes:
    return _jsonl(
        [
            {
                "input": {"messages": [{"role": "user", "content": f"Name the number {i}."}]},
                "preferred_output": [{"role": "assistant", "content": f"{i}."}],
                "non_preferred_output": [{"role": "assistant", "content": "I won't."}],
            }
            for i in range(n)
        ]
    )


def alpaca_json_array(n: int = 12) -> bytes:
    return json.dumps(
        [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(n)],
        indent=1,
    ).encode()


def sharegpt_jsonl(n: int = 12) -> bytes:
    return _jsonl(
        [
            {
                "conversations": [
                    {"from": "human", "value": f"Say {i}."},
                    {"from": "gpt", "value": f"{i}"},
                ]
            }
            for i in range(n)
        ]
    )
