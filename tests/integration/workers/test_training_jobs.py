"""Fine-tuning jobs run to the end on real workers: Postgres, Redis, Celery, SeaweedFS.

Each test starts its own `loraplex worker` processes; the jobs are submitted with the
official openai SDK.
"""

from __future__ import annotations

import io
import json
import os
import signal
from typing import Any

import pytest
from openai import OpenAI

from tests import sample_data
from tests.conftest import TenantCreds
from tests.integration.conftest import TrainingStack, job_status, wait_for, wait_status

TERMINAL = {"succeeded", "failed", "cancelled"}


def _client(stack: TrainingStack, tenant: TenantCreds) -> OpenAI:
    return OpenAI(base_url=stack.api.openai_base_url, api_key=tenant.api_key, max_retries=0)


def _upload(client: OpenAI, data: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def _wait_terminal(
    stack: TrainingStack, tenant: TenantCreds, job_id: str, timeout: float = 240
) -> dict[str, Any]:
    return wait_status(stack, tenant.api_key, job_id, TERMINAL, timeout)


def _events(client: OpenAI, job_id: str) -> list[Any]:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def _adapter_prefix(stack: TrainingStack, tenant: TenantCreds, job_id: str) -> str:
    """The published adapter's folder (one per attempt, under the job's)."""
    (manifest,) = [
        k
        for k in stack.keys(f"tenants/{tenant.tenant_id}/models/{job_id}/")
        if k.endswith("/manifest.json")
    ]
    return manifest.removesuffix("/manifest.json")


def _sft_method(**hyper: Any) -> dict[str, Any]:
    base = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "lora_rank": 8}
    return {"type": "supervised", "supervised": {"hyperparameters": {**base, **hyper}}}


def test_sft_job_succeeds_and_publishes_adapter(
    stack: TrainingStack, tenant: TenantCreds, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    stack.start_worker("w-sft")
    client = _client(stack, tenant)
    file_id = _upload(client, sample_data.chat_jsonl(24))
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        suffix="unit",
        seed=3,
        method=_sft_method(n_epochs=3),
    )
    final = _wait_terminal(stack, tenant, job.id)
    assert final["status"] == "succeeded", (final, stack.worker_log("w-sft"))
    name = final["fine_tuned_model"]
    assert isinstance(name, str) and name.startswith(f"ft:tiny-llama:{tenant.slug}:unit:")
    assert final["trained_tokens"] and final["hyperparameters"]["batch_size"] == 4  # type: ignore[index]

    events = _events(client, job.id)
    losses = [
        e.data["train_loss"]
        for e in events
        if e.type == "metrics" and e.data and "train_loss" in e.data
    ]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert any("successfully completed" in e.message for e in events)
    assert name in [m.id for m in client.models.list()]

    keys = stack.keys(f"tenants/{tenant.tenant_id}/models/{job.id}/")
    names = sorted(k.rsplit("/", 1)[-1] for k in keys)
    assert names == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    s3 = stack.s3()
    prefix = _adapter_prefix(stack, tenant, job.id)
    manifest = json.loads(
        s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    )
    import hashlib

    for filename, info in manifest["files"].items():
        body = s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/{filename}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == info["sha256"]
    assert manifest["base_model"] == "tiny-llama" and manifest["lora_rank"] == 8
    config = json.loads(
        s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/adapter_config.json")["Body"].read()
    )
    assert config["base_model_name_or_path"] == "tiny-llama"

    # The adapter loads with peft on the base model; its LoRA B matrices moved away from zero.
    from safetensors.torch import load_file

    weights_path = tmp_path / "adapter_model.safetensors"
    weights_path.write_bytes(
        s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/adapter_model.safetensors")["Body"].read()
    )
    weights = load_file(weights_path)
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(float(t.abs().sum()) > 0 for t in lora_b)


def test_kill_9_mid_training_resumes_from_checkpoint(
    stack: TrainingStack, tenant: TenantCreds
) -> None:
    first = stack.start_worker("w-doomed")
    client = _client(stack, tenant)
    file_id = _upload(client, sample_data.chat_jsonl(48))
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        method=_sft_method(n_epochs=12, batch_size=2, packing=False),
    )
    wait_for(
        lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 180, "a first checkpoint"
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stack.start_worker("w-rescue")
    final = _wait_terminal(stack, tenant, job.id, timeout=300)
    assert final["status"] == "succeeded", (final, stack.worker_log("w-rescue"))
    messages = [e.message for e in _events(client, job.id)]
    assert any("stopped responding" in m for m in messages)
    resumed = [m for m in messages if m.startswith("Resumed training from the checkpoint at step")]
    assert resumed and not resumed[0].endswith("step 0.")
    # Published once: one adapter folder, one model row.
    assert len(stack.keys(f"tenants/{tenant.tenant_id}/models/")) == 3
    assert [m.id for m in client.models.list() if m.id.startswith("ft:")] == [
        final["fine_tuned_model"]
    ]


def test_cancel_while_running(stack: TrainingStack, tenant: TenantCreds) -> None:
    import time

    stack.start_worker("w-cancel")
    client = _client(stack, tenant)
    file_id = _upload(client, sample_data.chat_jsonl(48))
    long_job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        method=_sft_method(n_epochs=50, batch_size=1, packing=False),
    )
    wait_for(
        lambda: any(e.type == "metrics" for e in _events(client, long_job.id)),
        180,
        "training to start",
    )
    asked = time.monotonic()
    client.fine_tuning.jobs.cancel(long_job.id)
    final = wait_status(stack, tenant.api_key, long_job.id, {"cancelled"}, 10)
    assert time.monotonic() - asked < 10
    assert final["fine_tuned_model"] is None
    assert stack.keys(f"tenants/{tenant.tenant_id}/models/") == []
    # The worker is free again: the next job runs to the end.
    quick = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=file_id, method=_sft_method(n_epochs=1)
    )
    assert _wait_terminal(stack, tenant, quick.id)["status"] == "succeeded"


def test_crashing_recipe_fails_after_max_attempts(
    stack: TrainingStack, tenant: TenantCreds, tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from api.catalog.service import register_base_model
    from models_db.session import transaction

    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_model_dir, broken)
    with transaction(stack.api.session_factory) as session:  # type: ignore[arg-type]
        register_base_model(session, "broken-llama", str(broken))
    # The tokenizer is intact (validation passes) but the weights are gone: every training
    # attempt fails the same way.
    (broken / "model.safetensors").unlink()
    client = _client(stack, tenant)
    file_id = _upload(client, sample_data.chat_jsonl(12))
    job = client.fine_tuning.jobs.create(
        model="broken-llama", training_file=file_id, method=_sft_method(n_epochs=1)
    )
    stack.start_worker("w-crash")
    final = _wait_terminal(stack, tenant, job.id)
    assert final["status"] == "failed", final
    error = final["error"]
    assert isinstance(error, dict) and error["code"] == "training_failed" and error["message"]
    attempts = [e.message for e in _events(client, job.id) if e.message.startswith("Attempt ")]
    assert len(attempts) == 3, attempts


def test_dpo_job_and_pause_resume(stack: TrainingStack, tenant: TenantCreds) -> None:
    stack.start_worker("w-dpo")
    client = _client(stack, tenant)
    dpo_file = _upload(client, sample_data.dpo_jsonl(16), "prefs.jsonl")
    dpo = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=dpo_file,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "beta": 0.1}},
        },
    )
    assert _wait_terminal(stack, tenant, dpo.id)["status"] == "succeeded", stack.worker_log("w-dpo")

    sft_file = _upload(client, sample_data.chat_jsonl(48))
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=sft_file,
        method=_sft_method(n_epochs=20, batch_size=1, packing=False),
    )
    wait_for(
        lambda: any(e.type == "metrics" for e in _events(client, job.id)), 180, "training to start"
    )
    client.fine_tuning.jobs.pause(job.id)
    wait_for(
        lambda: job_status(stack, tenant.api_key, job.id)["status"] == "paused", 60, "the pause"
    )
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    paused_at = max(c.step_number for c in checkpoints)
    client.fine_tuning.jobs.resume(job.id)
    final = _wait_terminal(stack, tenant, job.id, timeout=300)
    assert final["status"] == "succeeded"
    messages = [e.message for e in _events(client, job.id)]
    assert f"Resumed training from the checkpoint at step {paused_at}." in messages


@pytest.mark.parametrize("nproc", [2])
def test_two_process_ddp_run(stack: TrainingStack, tenant: TenantCreds, nproc: int) -> None:
    stack.start_worker("w-ddp", LORAPLEX_TRAIN_NPROC=str(nproc))
    client = _client(stack, tenant)
    file_id = _upload(client, sample_data.chat_jsonl(32))
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=file_id, method=_sft_method(n_epochs=1)
    )
    final = _wait_terminal(stack, tenant, job.id, timeout=300)
    assert final["status"] == "succeeded", stack.worker_log("w-ddp")
    assert len(stack.keys(f"tenants/{tenant.tenant_id}/models/{job.id}/")) == 3


def test_the_fine_tune_really_learns(
    stack: TrainingStack, tenant: TenantCreds, tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Facts the base model cannot know: 0% exact before, >= 90% with the published adapter."""
    from tests.fixtures.facts import FACTS_PATH, exact_match_rate

    stack.start_worker("w-facts")
    client = _client(stack, tenant)
    # OpenAI caps n_epochs at 50, so the file carries each fact four times: 8 steps an epoch
    # at batch 8, 400 steps in all (the recipe's own test needs about 150 full passes).
    file_id = _upload(client, FACTS_PATH.read_bytes() * 4, "facts.jsonl")
    hyper = {
        "n_epochs": 50,
        "batch_size": 8,
        "learning_rate_multiplier": 10,
        "lora_rank": 16,
        "max_seq_len": 256,
    }
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
    )
    final = _wait_terminal(stack, tenant, job.id, timeout=400)
    assert final["status"] == "succeeded", stack.worker_log("w-facts")

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    s3 = stack.s3()
    prefix = _adapter_prefix(stack, tenant, job.id)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        body = s3.get_object(Bucket=stack.bucket, Key=f"{prefix}/{name}")["Body"].read()
        (adapter / name).write_bytes(body)
    assert exact_match_rate(tiny_model_dir) == 0.0
    assert exact_match_rate(tiny_model_dir, adapter) >= 0.9
