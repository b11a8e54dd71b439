"""The official openai SDK against a running API on Postgres, Redis and SeaweedFS."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from openai import OpenAI

from tests import sample_data


@pytest.fixture
def client(api_server, make_tenant) -> OpenAI:  # type: ignore[no-untyped-def]
    return OpenAI(base_url=api_server.openai_base_url, api_key=make_tenant().api_key, max_retries=0)


def test_fine_tuning_lifecycle(client: OpenAI) -> None:
    uploaded = client.files.create(
        file=("train.jsonl", io.BytesIO(sample_data.chat_jsonl(12))), purpose="fine-tune"
    )
    assert uploaded.id.startswith("file-")
    assert uploaded.purpose == "fine-tune"
    assert uploaded.bytes == len(sample_data.chat_jsonl(12))
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).read() == sample_data.chat_jsonl(12)

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        suffix="sdk-test",
        seed=7,
        metadata={"team": "search"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.id.startswith("ftjob-")
    assert job.status == "validating_files"
    assert job.model == "tiny-llama"
    assert job.seed == 7
    assert job.hyperparameters.n_epochs == 2
    assert job.hyperparameters.batch_size == "auto"
    assert job.method is not None and job.method.type == "supervised"

    fetched = client.fine_tuning.jobs.retrieve(job.id)
    assert fetched.id == job.id and fetched.metadata == {"team": "search"}
    listed = client.fine_tuning.jobs.list(limit=5, metadata={"team": "search"})
    assert [j.id for j in listed.data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []
    # OpenAI's documented filter for jobs without metadata, sent as the SDK tells users to.
    plain = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
    empty = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id, metadata={}
    )
    without = client.fine_tuning.jobs.list(extra_query={"metadata": "null"}).data
    assert sorted(j.id for j in without) == sorted([plain.id, empty.id])
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list(extra_query={"metadata": "null", "metadata[team]": "x"})
    # Another purpose is an empty list, not an error.
    assert client.files.list(purpose="batch").data == []
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]

    events = client.fine_tuning.jobs.list_events(job.id)
    assert any(job.id in e.message for e in events.data)
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"

    models = [m.id for m in client.models.list()]
    assert "tiny-llama" in models
    assert client.models.retrieve("tiny-llama").owned_by == "loraplex"

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_dpo_job_on_dpo_file_and_mismatch(client: OpenAI) -> None:
    dpo = client.files.create(
        file=("p.jsonl", io.BytesIO(sample_data.dpo_jsonl())), purpose="fine-tune"
    )
    sft = client.files.create(
        file=("s.jsonl", io.BytesIO(sample_data.chat_jsonl())), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=dpo.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
    )
    assert job.method is not None and job.method.type == "dpo"
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=sft.id, method={"type": "dpo"}
        )
    assert info.value.body["param"] == "training_file"  # type: ignore[index]


@pytest.mark.parametrize(
    ("data", "name"),
    [(sample_data.alpaca_json_array(), "alpaca.json"), (sample_data.sharegpt_jsonl(), "sg.jsonl")],
)
def test_llamafactory_formats_upload(client: OpenAI, data: bytes, name: str) -> None:
    uploaded = client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
    assert job.status == "validating_files"


def test_bad_requests_name_the_field(client: OpenAI) -> None:
    f = client.files.create(
        file=("t.jsonl", io.BytesIO(sample_data.chat_jsonl())), purpose="fine-tune"
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
    assert info.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=f.id, extra_body={"surprise": 1}
        )
    assert info.value.body["param"] == "surprise"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=f.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 500}}},
        )
    assert info.value.body["param"] == "method.supervised.hyperparameters.n_epochs"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=f.id,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"quantization": "4bit"}},
            },
        )
    assert "CUDA" in info.value.message
    assert info.value.body["param"] == "method.supervised.hyperparameters.quantization"  # type: ignore[index]
    # The legacy top-level hyperparameters: the error names the field where it was sent.
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=f.id,
            extra_body={"hyperparameters": {"quantization": "4bit"}},
        )
    assert info.value.body["param"] == "hyperparameters.quantization"  # type: ignore[index]
    # A rank the serving fleet could not load (vLLM's --max-lora-rank, 16 here) is refused
    # before training, not after.
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=f.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"lora_rank": 32}}},
        )
    assert info.value.body["param"] == "method.supervised.hyperparameters.lora_rank"  # type: ignore[index]
    assert info.value.code == "unsupported_on_this_deployment"


_HP = "method.supervised.hyperparameters."


@pytest.mark.parametrize(
    ("hyperparameters", "extra", "param", "says"),
    [
        ({"n_epochs": True}, {}, _HP + "n_epochs", "'auto' or a valid integer"),
        ({"n_epochs": "3"}, {}, _HP + "n_epochs", "valid integer"),
        ({"learning_rate_multiplier": "0.5"}, {}, _HP + "learning_rate_multiplier", "number"),
        ({"packing": "yes"}, {}, _HP + "packing", "valid boolean"),
        ({}, {"seed": "5"}, "seed", "valid integer"),
        ({}, {"seed": 2.0}, "seed", "valid integer"),
    ],
)
def test_values_of_the_wrong_json_type_are_refused_not_converted(
    client: OpenAI,
    hyperparameters: dict[str, object],
    extra: dict[str, object],
    param: str,
    says: str,
) -> None:
    f = client.files.create(
        file=("t.jsonl", io.BytesIO(sample_data.chat_jsonl())), purpose="fine-tune"
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=f.id,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            extra_body=extra,
        )
    assert info.value.body["param"] == param  # type: ignore[index]
    assert says in info.value.message
    # A JSON integer is still a valid number where a float is asked for.
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=f.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"learning_rate_multiplier": 2}},
        },
    )
    assert job.hyperparameters.learning_rate_multiplier == 2


def test_a_json_syntax_error_is_reported_as_such(api_server, make_tenant) -> None:  # type: ignore[no-untyped-def]
    creds = make_tenant()
    response = httpx.post(
        f"{api_server.base_url}/v1/fine_tuning/jobs",
        content=b'{"model": "tiny-llama", ',
        headers={"Authorization": f"Bearer {creds.api_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "body" and "could not parse the JSON" in error["message"]
    # Bodies the JSON decoder cannot even start on: the same field, the same words.
    for body in (b'{"model": "tiny\xffllama"}', b'{"seed": 1' + b"0" * 5000 + b"}"):
        response = httpx.post(
            f"{api_server.base_url}/v1/fine_tuning/jobs",
            content=body,
            headers={
                "Authorization": f"Bearer {creds.api_key}",
                "Content-Type": "application/json",
            },
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "body" and "could not parse the JSON" in error["message"]


def test_pagination(client: OpenAI) -> None:
    f = client.files.create(
        file=("t.jsonl", io.BytesIO(sample_data.chat_jsonl())), purpose="fine-tune"
    )
    created = [
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id).id for _ in range(5)
    ]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == created[::-1][:2]
    assert first.has_more
    everything = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # auto-paginates
    assert everything == created[::-1]


def test_files_uploaded_with_expires_after_expire(api_server, client: OpenAI) -> None:  # type: ignore[no-untyped-def]
    from models_db.models import File
    from models_db.session import transaction

    data = sample_data.chat_jsonl(12)
    uploaded = client.files.create(
        file=("t.jsonl", io.BytesIO(data)),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert uploaded.expires_at == uploaded.created_at + 3600
    assert client.files.retrieve(uploaded.id).expires_at == uploaded.expires_at
    for bad, param in (
        ({"anchor": "created_at", "seconds": 59}, "expires_after[seconds]"),
        ({"anchor": "created_at", "seconds": 2_592_001}, "expires_after[seconds]"),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after[anchor]"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(
                file=("t.jsonl", io.BytesIO(data)),
                purpose="fine-tune",
                expires_after=bad,  # type: ignore[arg-type]
            )
        assert refused.value.param == param

    # Once past its time the file is gone for the API: not listed, not found, not trainable.
    with transaction(api_server.session_factory) as session:
        row = session.get(File, uploaded.id)
        assert row is not None
        row.expires_at = row.created_at - 1
    assert uploaded.id not in [f.id for f in client.files.list()]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.APIStatusError) as refused_job:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
    assert refused_job.value.status_code in (400, 404)
