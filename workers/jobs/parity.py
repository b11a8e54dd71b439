"""Train/serve parity: before a model is announced, serving must answer a held prompt the way
the trainer's own greedy decoding did.

The trainer reports its greedy answer to the first training example's prompt (``parity`` in
the ``done`` event). The worker asks the gateway to load the just-published adapter and answer
the same prompt greedily (a signed internal call); a different answer means serving would use a
different chat template, base model or weights than training did, and the job fails loudly
instead of shipping a silently different model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from common.internal_auth import sign

log = logging.getLogger(__name__)

_SERVING_REFUSED = frozenset({"adapter_integrity_error", "adapter_load_failed"})


@dataclass(frozen=True)
class ParityResult:
    # True: same answer; False: a different one; None: the check could not run.
    ok: bool | None
    trainer_text: str
    served_text: str | None = None
    detail: str = ""


def check_parity(
    gateway_url: str,
    secret_key: str,
    adapter: dict[str, str],
    sample: dict[str, Any],
    timeout: float = 120.0,
) -> ParityResult:
    body = json.dumps(
        {"adapter": adapter, "messages": sample["messages"], "max_tokens": sample["max_tokens"]}
    ).encode()
    headers = {"content-type": "application/json", **sign(secret_key, body)}
    expected = str(sample["text"])
    try:
        response = httpx.post(
            f"{gateway_url.rstrip('/')}/internal/parity",
            content=body,
            headers=headers,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        # The tenant reads the detail in the job's events: the gateway's address stays here.
        log.warning("parity check: gateway %s unreachable: %s", gateway_url, exc)
        return ParityResult(None, expected, detail=f"gateway unreachable ({type(exc).__name__})")
    if response.status_code != 200:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {}
        if isinstance(error, dict) and error.get("code") in _SERVING_REFUSED:
            # Serving cannot use this adapter at all: as much a mismatch as a wrong answer.
            return ParityResult(False, expected, None, detail=str(error.get("message")))
        # The gateway's own error message is written for tenants; anything else (a proxy's
        # page, say) goes to the log only.
        log.warning(
            "parity check: gateway answered %s: %s", response.status_code, response.text[:300]
        )
        message = error.get("message") if isinstance(error, dict) else None
        said = f": {str(message)[:300]}" if isinstance(message, str) and message else ""
        return ParityResult(None, expected, detail=f"gateway answered {response.status_code}{said}")
    answer = response.json()
    served, served_ids = answer.get("text"), answer.get("token_ids")
    if served_ids is not None and sample.get("token_ids") is not None:
        # Token ids: the text of both sides may differ in a trailing partial UTF-8 sequence
        # (HF decodes it as U+FFFD, vLLM holds it back) while the tokens are the same.
        same = [int(t) for t in served_ids] == [int(t) for t in sample["token_ids"]]
    else:
        same = served in (expected, expected.rstrip("\ufffd"))
    return ParityResult(same, expected, served)
