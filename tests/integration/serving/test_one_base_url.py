"""Embedded layout: the API and the gateway on one port. One ``OpenAI(base_url=…)`` client
uploads a file, fine-tunes, and chats with the result; the worker's train/serve parity check
runs through the gateway before the model is announced."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from sqlalchemy import select

from models_db.models import FineTunedModel
from tests import sample_data
from tests.conftest import TenantCreds, free_port, start_server
from tests.integration.conftest import TrainingStack, wait_status
from tests.integration.serving.conftest import gateway_settings
from tests.serving_helpers import load_hf_reference


@pytest.fixture(scope="module")
def combined_url(
    training_stack: TrainingStack, vllm_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from api.app import create_app
    from serving.app import create_gateway_app
    from serving.combined import CombinedApp

    tmp = tmp_path_factory.mktemp("combined")
    app = CombinedApp(
        create_app(training_stack.api.settings),  # type: ignore[arg-type]
        create_gateway_app(gateway_settings(training_stack, tmp, [vllm_server.url])),
    )
    port = free_port()
    server, thread = start_server(app, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_upload_train_and_chat_through_one_base_url(
    combined_url: str,
    stack: TrainingStack,
    new_tenant: Callable[..., TenantCreds],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    tenant = new_tenant(scopes=("finetune", "inference"))
    stack.start_worker("w-parity", LORAPLEX_GATEWAY_URL=combined_url)
    client = OpenAI(base_url=f"{combined_url}/v1", api_key=tenant.api_key, max_retries=0)
    file_id = client.files.create(
        file=("train.jsonl", io.BytesIO(sample_data.chat_jsonl(24))), purpose="fine-tune"
    ).id
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        suffix="chat",
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 3,
                    "batch_size": 4,
                    "lora_rank": 8,
                    "learning_rate_multiplier": 5.0,
                }
            },
        },
    )
    final = wait_status(stack, tenant.api_key, job.id, {"succeeded", "failed"}, 300)
    assert final["status"] == "succeeded", (final, stack.worker_log("w-parity"))
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Train/serve parity check passed") for m in messages), "\n".join(
        messages
    )

    name = str(final["fine_tuned_model"])
    assert name in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert answer.model == name and answer.usage is not None
    assert answer.usage.completion_tokens >= 1

    # Train/serve parity on 10 prompts: the gateway's greedy tokens are HF + peft's with the
    # adapter the job published, and the fine-tune changed what the base model says.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    s3 = stack.s3()
    with stack.api.session_factory() as session:  # type: ignore[operator]
        row = session.scalars(select(FineTunedModel).where(FineTunedModel.id == name)).one()
        prefix = f"{stack.s3_prefix}/{row.storage_prefix}"
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        body = s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/{filename}")["Body"].read()
        (adapter / filename).write_bytes(body)
    reference = load_hf_reference(tiny_model_dir, adapter)
    differs = 0
    for prompt in TEN_PROMPTS:
        served = _greedy_ids(client, name, prompt)
        assert served == reference.generate_ids([{"role": "user", "content": prompt}], 12), prompt
        differs += served != _greedy_ids(client, "tiny-llama", prompt)
    assert differs >= 8, f"the fine-tune changed only {differs} of 10 answers"


TEN_PROMPTS = [
    "hello",
    "What is the capital of France?",
    "Tell me a story.",
    "List three colors.",
    "How are you?",
    "Summarize the plot of a movie.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Translate 'good morning' to French.",
    "Why is the sky blue?",
]


def _greedy_ids(client: OpenAI, model: str, prompt: str) -> list[int]:
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    ids = (response.choices[0].model_extra or {}).get("token_ids")
    assert isinstance(ids, list)
    return [int(i) for i in ids]
