"""How the prompt of a request that ended without vLLM's usage report is counted."""

from __future__ import annotations

import json

import pytest

from serving import unfinished


def test_a_chat_prompt_is_counted_with_its_messages_tools_and_template_options() -> None:
    body = {
        "model": "ft:x",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 5,
        "stream": True,
    }
    count = unfinished.prompt_count("chat/completions", json.dumps(body).encode(), "base")
    assert count == unfinished.PromptCount(
        0,
        [
            {
                "model": "base",
                "messages": body["messages"],
                "tools": body["tools"],
                "chat_template_kwargs": {"enable_thinking": False},
            }
        ],
    )


@pytest.mark.parametrize(
    ("prompt", "known", "texts"),
    [
        ("Once upon", 0, ["Once upon"]),
        (["a", "b"], 0, ["a", "b"]),
        ([1, 2, 3], 3, []),
        ([[1, 2], [3]], 3, []),
        ([[1, 2], "a"], 2, ["a"]),
    ],
)
def test_completion_prompts_of_every_shape(prompt: object, known: int, texts: list[str]) -> None:
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    count = unfinished.prompt_count("completions", body, "base")
    assert count is not None and count.known == known
    assert [r["prompt"] for r in count.requests] == texts
    assert all(r["model"] == "base" for r in count.requests)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1]",
        json.dumps({"prompt": 5}).encode(),
        json.dumps({"prompt": [{"x": 1}]}).encode(),
        json.dumps({"prompt": ["a"] * (unfinished.MAX_PROMPTS_TO_TOKENIZE + 1)}).encode(),
    ],
    ids=["not-json", "not-object", "number", "objects", "too-many-texts"],
)
def test_prompts_that_can_only_be_estimated(body: bytes) -> None:
    assert unfinished.prompt_count("completions", body, "base") is None
    assert unfinished.estimate(body) == max(1, len(body) // 4)


def test_streamed_tokens_leave_out_the_role_announcement_of_a_chat_answer() -> None:
    assert unfinished.streamed_tokens("chat/completions", 5) == 4
    assert unfinished.streamed_tokens("chat/completions", 0) == 0
    assert unfinished.streamed_tokens("completions", 5) == 5
