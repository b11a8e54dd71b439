"""The training subprocess as the worker runs it: events, adapter, resume, pause, DPO, DDP, errors.

Every run trains the tiny model on the fact dataset for a few steps; one reference run (module
scope) is shared by the tests that only read its events and files, and is what interrupted runs
must reproduce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from common.datasets import DatasetFormat
from tests.fixtures.facts import facts_spec, tokenize_facts
from tests.unit.training.helpers import Finished, read_events, run_spec, start_spec
from workers.training.data import SFTExamples, load_tokenized, tokenize_to_file
from workers.training.model import cpu_has_native_bf16
from workers.training.spec import TrainingSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def facts(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "facts.safetensors"
    stats = tokenize_facts(tiny_model, path)
    assert stats.examples == 16
    return path


def short_run(tiny_model: Path, facts: Path, workdir: Path, **overrides: Any) -> TrainingSpec:
    """16 facts, 4 per step, 3 epochs = 12 steps; checkpoints every 4, evaluation every 6."""
    settings: dict[str, Any] = {
        "train_data": str(facts),
        "valid_data": str(facts),
        "max_steps": None,
        "n_epochs": 3,
        "batch_size": 4,
        "checkpoint_every_steps": 4,
        "eval_every_steps": 6,
        "logging_steps": 1,
        **overrides,
    }
    return facts_spec(tiny_model, workdir, **settings)


@pytest.fixture(scope="module")
def reference(
    tiny_model: Path, facts: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingSpec, Finished]:
    workdir = tmp_path_factory.mktemp("reference")
    spec = dataclasses.replace(
        short_run(tiny_model, facts, workdir), parity_messages=PARITY_PROMPT, parity_max_tokens=8
    )
    finished = run_spec(spec, workdir / "spec.json")
    assert finished.returncode == 0, finished.stderr[-3000:]
    return spec, finished


PARITY_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_hashes(spec: TrainingSpec) -> dict[str, str]:
    return {name: sha256(Path(spec.output_dir) / name) for name in ADAPTER_FILES}


def test_events_stream_in_order_and_loss_goes_down(
    reference: tuple[TrainingSpec, Finished], facts: Path
) -> None:
    spec, run = reference
    kinds = [e["type"] for e in run.events]

    assert kinds[0] == "started" and kinds[-1] == "done"
    assert run.events[0] == {
        "type": "started",
        "total_steps": 12,
        "resumed_from_step": None,
        "device": "cpu",
        "dtype": "float32",
        "attn": "sdpa_varlen",
        "examples": 16,
        "examples_per_step": 4.0,
    }
    metrics = run.of_type("metrics")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert set(metrics[0]) == {
        "type",
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "learning_rate",
        "tokens_per_second",
        "epoch",
    }
    assert all(m["tokens_per_second"] > 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    evals = run.of_type("eval")
    assert [e["step"] for e in evals] == [6, 12]
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    assert [c["step"] for c in run.of_type("checkpoint")] == [4, 8]  # none at the last step
    done = run.last
    assert done["adapter_dir"] == spec.output_dir
    assert done["metrics"]["steps"] == 12
    assert done["metrics"]["valid_loss"] == evals[-1]["valid_loss"]
    assert done["metrics"]["train_loss"] == metrics[-1]["train_loss"]
    # Every target token of the 16 facts, once per epoch.
    data = load_tokenized(facts)
    assert isinstance(data, SFTExamples)
    assert done["metrics"]["trained_tokens"] == 3 * int(data.loss_mask.sum())
    assert done["metrics"]["seconds"] > 0


def test_the_parity_sample_is_the_adapters_own_greedy_answer(
    reference: tuple[TrainingSpec, Finished], tiny_model: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, run = reference
    sample = run.last["parity"]
    assert sample["messages"] == PARITY_PROMPT and sample["max_tokens"] == 8
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, spec.output_dir).eval()
    prompt = tokenizer.apply_chat_template(
        PARITY_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert sample["token_ids"] == out[0, prompt.shape[1] :].tolist()
    assert sample["text"] == tokenizer.decode(sample["token_ids"], skip_special_tokens=True)


def test_the_adapter_is_two_files_naming_the_serving_base(
    reference: tuple[TrainingSpec, Finished],
) -> None:
    spec, _ = reference
    out = Path(spec.output_dir)

    assert sorted(p.name for p in out.iterdir()) == ADAPTER_FILES
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert config["target_modules"] == sorted(config["target_modules"])
    assert "q_proj" in config["target_modules"] and "lm_head" not in config["target_modules"]


def test_lora_weights_moved_and_the_base_did_not(
    reference: tuple[TrainingSpec, Finished], tiny_model: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec, _ = reference
    weights = load_file(str(Path(spec.output_dir) / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    original = {k: v.clone() for k, v in base.state_dict().items()}

    tuned = PeftModel.from_pretrained(base, spec.output_dir)

    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    lora_b = [v for k, v in weights.items() if ".lora_B." in k]
    assert len(lora_b) == 14  # 7 linear layers x 2 decoder layers
    assert all(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero
    with tuned.disable_adapter():
        for name, value in tuned.get_base_model().state_dict().items():
            key = name.replace(".base_layer", "")
            if "lora_" not in name:
                assert torch.equal(value, original[key]), name


def test_same_seed_and_data_give_identical_bytes(
    reference: tuple[TrainingSpec, Finished], tiny_model: Path, facts: Path, tmp_path: Path
) -> None:
    spec, _ = reference
    again = short_run(tiny_model, facts, tmp_path)

    finished = run_spec(again, tmp_path / "spec.json")

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert adapter_hashes(again) == adapter_hashes(spec)


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_adapter(
    reference: tuple[TrainingSpec, Finished], tiny_model: Path, facts: Path, tmp_path: Path
) -> None:
    spec, _ = reference
    interrupted = short_run(tiny_model, facts, tmp_path)
    proc = start_spec(interrupted, tmp_path / "spec.json")
    checkpoint = next(e for e in read_events(proc) if e["type"] == "checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    interrupted.resume_from = checkpoint["path"]
    resumed = run_spec(interrupted, tmp_path / "spec.json")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint["step"] == 4
    assert resumed.events[0]["resumed_from_step"] == 4
    assert [m["step"] for m in resumed.of_type("metrics")] == list(range(5, 13))
    # Optimizer, scheduler, data order and RNG all came back: the result is bit-identical.
    assert adapter_hashes(interrupted) == adapter_hashes(spec)
    assert (
        resumed.last["metrics"]["trained_tokens"] == reference[1].last["metrics"]["trained_tokens"]
    )


def test_sigusr1_pauses_with_a_checkpoint_and_the_run_resumes(
    reference: tuple[TrainingSpec, Finished], tiny_model: Path, facts: Path, tmp_path: Path
) -> None:
    spec, _ = reference
    paused = short_run(tiny_model, facts, tmp_path, checkpoint_every_steps=0)
    proc = start_spec(paused, tmp_path / "spec.json")
    events = []
    for event in read_events(proc):
        events.append(event)
        if event["type"] == "metrics" and event["step"] == 2:
            proc.send_signal(signal.SIGUSR1)
    returncode = proc.wait(timeout=60)

    assert returncode == 0
    checkpoint, last = events[-2], events[-1]
    assert checkpoint["type"] == "checkpoint" and last == {
        "type": "paused",
        "step": checkpoint["step"],
    }
    assert 2 <= checkpoint["step"] < 12
    assert not Path(paused.output_dir).exists()

    paused.resume_from = checkpoint["path"]
    resumed = run_spec(paused, tmp_path / "spec.json")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events[0]["resumed_from_step"] == checkpoint["step"]
    assert adapter_hashes(paused) == adapter_hashes(spec)


def test_a_pause_while_torch_is_still_loading_pauses_after_the_first_step(
    tiny_model: Path, facts: Path, tmp_path: Path
) -> None:
    """The worker may pass on a pause at any time; SIGUSR1's default action is to end the
    process, so the handler must be in place long before the recipe gets to training."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc to see when torch is being loaded")
    spec = short_run(tiny_model, facts, tmp_path, checkpoint_every_steps=0)
    proc = start_spec(spec, tmp_path / "spec.json")
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "torch was never loaded"
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    events = list(read_events(proc))

    assert proc.wait(timeout=120) == 0, events
    assert [e["type"] for e in events][-2:] == ["checkpoint", "paused"]
    assert events[-1]["step"] == events[-2]["step"] == 1


def test_a_missing_base_model_is_a_clear_error(tmp_path: Path, facts: Path) -> None:
    spec = facts_spec(tmp_path / "nowhere", tmp_path, train_data=str(facts))

    finished = run_spec(spec, tmp_path / "spec.json", timeout=60)

    assert finished.returncode == 1
    assert finished.events == [
        {"type": "error", "message": f"base model folder {tmp_path / 'nowhere'} does not exist"}
    ]


def test_4bit_without_a_gpu_is_refused(tiny_model: Path, facts: Path, tmp_path: Path) -> None:
    spec = facts_spec(tiny_model, tmp_path, train_data=str(facts), quantization="4bit")

    finished = run_spec(spec, tmp_path / "spec.json", timeout=120)

    assert finished.returncode == 1
    assert finished.last["type"] == "error"
    assert "needs a CUDA GPU" in finished.last["message"]


def test_dpo_trains_a_dora_adapter(tiny_model: Path, tmp_path: Path) -> None:
    pairs = [
        (
            DatasetFormat.DPO,
            {
                "input": {"messages": [{"role": "user", "content": f"Name a number after {i}."}]},
                "preferred_output": [{"role": "assistant", "content": f"{i + 1}."}],
                "non_preferred_output": [{"role": "assistant", "content": "I will not."}],
            },
        )
        for i in range(12)
    ]
    tokenize_to_file(pairs, tiny_model, tmp_path / "pairs", method="dpo", max_seq_len=128)
    spec = facts_spec(
        tiny_model,
        tmp_path,
        method="dpo",
        train_data=str(tmp_path / "pairs"),
        max_steps=6,
        batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        dtype="auto",  # bf16 autocast on CPUs with native bf16 (this one), float32 elsewhere
        use_dora=True,
    )

    finished = run_spec(spec, tmp_path / "spec.json")

    assert finished.returncode == 0, finished.stderr[-3000:]
    started = finished.events[0]
    assert started["dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert started["attn"] == "sdpa"  # pairs are padded, not packed
    losses = [m["train_loss"] for m in finished.of_type("metrics")]
    assert losses[0] == pytest.approx(0.693, abs=1e-3)  # log 2: the policy starts as the reference
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in Path(spec.output_dir).iterdir()) == ADAPTER_FILES
    weights = load_file(str(Path(spec.output_dir) / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in name for name in weights)  # DoRA's magnitudes
    assert json.loads((Path(spec.output_dir) / "adapter_config.json").read_text())["use_dora"]


def test_two_processes_pause_together_and_finish_one_adapter(
    tiny_model: Path, facts: Path, tmp_path: Path
) -> None:
    spec = short_run(
        tiny_model,
        facts,
        tmp_path,
        nproc=2,
        n_epochs=2,
        eval_every_steps=None,
        checkpoint_every_steps=0,
    )
    proc = start_spec(spec, tmp_path / "spec.json")
    events = []
    for event in read_events(proc):
        events.append(event)
        if event["type"] == "metrics" and event["step"] == 2:
            proc.send_signal(signal.SIGUSR1)  # the launcher relays it to both ranks
    assert proc.wait(timeout=60) == 0

    kinds = [e["type"] for e in events]
    # Rank 0 alone reports: one started, one checkpoint, then paused.
    assert kinds.count("started") == 1 and kinds[-2:] == ["checkpoint", "paused"]
    assert events[0]["total_steps"] == 8  # 16 examples, 2 per process per step, 2 epochs
    checkpoint = Path(events[-2]["path"])
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}

    spec.resume_from = str(checkpoint)
    resumed = run_spec(spec, tmp_path / "spec.json")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events[0]["resumed_from_step"] == events[-1]["step"]
    assert [e["type"] for e in resumed.events].count("done") == 1
    assert sorted(p.name for p in Path(spec.output_dir).iterdir()) == ADAPTER_FILES


def test_two_processes_with_fsdp_train_one_complete_adapter(
    reference: tuple[TrainingSpec, Finished], tiny_model: Path, facts: Path, tmp_path: Path
) -> None:
    """FSDP on the CPU (gloo): the weights are sharded across the two processes, and the
    adapter written at the end is gathered whole: every LoRA matrix, full size."""
    spec = short_run(
        tiny_model,
        facts,
        tmp_path,
        nproc=2,
        parallelism="fsdp",
        n_epochs=2,
        eval_every_steps=None,
        checkpoint_every_steps=0,
        parity_messages=PARITY_PROMPT,
    )
    finished = run_spec(spec, tmp_path / "spec.json")
    assert finished.returncode == 0, finished.stderr[-3000:]
    done = finished.last
    assert done["type"] == "done" and done["parity"] is None  # sharded runs skip the sample
    losses = [m["train_loss"] for m in finished.of_type("metrics")]
    assert losses[-1] < losses[0]
    weights = load_file(str(Path(spec.output_dir) / "adapter_model.safetensors"))
    expected = load_file(str(Path(reference[0].output_dir) / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in expected.items()}
    assert all(float(v.abs().max()) > 0 for k, v in weights.items() if ".lora_B." in k)
