"""Usage of requests that end without vLLM's usage report.

vLLM reports token counts only once an answer is complete: in the usage field of a JSON answer,
or in the final usage chunk of a stream (which the gateway always asks for). A caller who leaves
early, or a replica that breaks off mid-stream, ends the request before that report, yet the
replica did the work: it processed the prompt and, on a stream, the caller received tokens.
Unbilled, such requests would be a way around both billing and the tokens-per-minute limit
(abort every stream just before its end).

So the gateway bills them itself, after the request has ended and off the hot path:

* the prompt, counted by the replica's own tokenizer and chat template (vLLM's ``/tokenize``,
  given the request's own messages, tools and template options), or an estimate of one token per
  four bytes of the request body when no replica of that base model can count it;
* on a stream, the chunks relayed to the caller: vLLM streams each generated token in its own
  chunk (a lower bound when one chunk carries several), less the first chunk of a chat answer,
  which only announces the assistant's role.

ADR 0008 records the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Fields of a chat request that change what its prompt tokenises to; vLLM's /tokenize takes them
# with the same meaning as /v1/chat/completions.
_CHAT_TEMPLATE_FIELDS = (
    "tools",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
)
# A completions request may carry many prompts; beyond this many texts it is estimated instead of
# asking the replica once per text.
MAX_PROMPTS_TO_TOKENIZE = 16
BYTES_PER_TOKEN_ESTIMATE = 4


@dataclass(frozen=True)
class PromptCount:
    """How to count a request's prompt tokens: ``known`` tokens already counted (prompts given as
    token ids), plus one ``/tokenize`` request per entry of ``requests``."""

    known: int
    requests: list[dict[str, Any]]


def prompt_count(endpoint: str, body: bytes, base_model: str) -> PromptCount | None:
    """The /tokenize requests that count ``body``'s prompt, or None when it can only be
    estimated."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    if endpoint == "chat/completions":
        request = {"model": base_model, "messages": payload.get("messages")}
        request.update({k: payload[k] for k in _CHAT_TEMPLATE_FIELDS if k in payload})
        return PromptCount(0, [request])
    return _completion_prompts(payload.get("prompt"), base_model)


def _completion_prompts(prompt: Any, base_model: str) -> PromptCount | None:
    """OpenAI's ``prompt``: a string, a list of strings, a list of token ids, or a list of
    lists of token ids."""
    if isinstance(prompt, str):
        return PromptCount(0, [{"model": base_model, "prompt": prompt}])
    if not isinstance(prompt, list):
        return None
    if all(isinstance(item, int) for item in prompt):
        return PromptCount(len(prompt), [])
    known, texts = 0, []
    for item in prompt:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list):
            known += len(item)
        else:
            return None
    if len(texts) > MAX_PROMPTS_TO_TOKENIZE:
        return None
    return PromptCount(known, [{"model": base_model, "prompt": text} for text in texts])


def estimate(body: bytes) -> int:
    """Prompt tokens when no tokenizer could count them."""
    return max(1, len(body) // BYTES_PER_TOKEN_ESTIMATE)


def streamed_tokens(endpoint: str, events_relayed: int) -> int:
    """Completion tokens of an unfinished stream, from the number of SSE events relayed."""
    role_announcement = 1 if endpoint == "chat/completions" else 0
    return max(0, events_relayed - role_announcement)
