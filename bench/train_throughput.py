"""Training throughput: loraplex's SFT recipe against LLaMA-Factory and plain HF, side by side.

Quality bar (DESIGN §11): real (non-pad) tokens/s of our SFT >= 1.5x LLaMA-Factory 0.9.5 with
default settings and >= 1.0x LLaMA-Factory with packing, same model, data, hyperparameters and
machine; held-out loss no worse; MFU reported against a matmul peak measured in the same run.

One invocation trains, one after the other (never two at once), on the same CPU threads:

* ``lf_default``: LLaMA-Factory 0.9.5, its default settings (padding to the longest example of
  each batch; its default gradient checkpointing stays on), with the hyperparameters below.
* ``lf_packing``: the same with ``packing: true`` (greedy knapsack packs of ``cutoff_len``
  tokens; packed examples attend to each other).
* ``lf_neat_packing``: the same with ``neat_packing: true`` (block-diagonal 4-D mask, so packed
  examples do not attend to each other).
* ``hf_padding``: plain ``transformers.Trainer`` + peft written below: the chat template's
  assistant mask for the labels, padding to the longest example of each batch.
* ``loraplex``: our recipe, ``python -m workers.training.run SPEC.json``.

LLaMA-Factory is a peer, not a dependency: it runs in its own venv (``.venv-llamafactory``,
created by ``bench/lf_env.sh`` if missing), through its own CLI. Everything else runs in the venv
that runs this script.

Same for every run: the base model (``build_tiny_model(preset="bench")``: hidden 512, 8 layers,
GQA 8/4 heads of 64), the conversations (generated here from a seed; written once as OpenAI chat
JSONL and once as the same messages in a LLaMA-Factory ``sharegpt`` JSON file with a
``dataset_info.json``; every conversation has a system message, so LLaMA-Factory's ``qwen``
template adds no default one and renders exactly our ChatML text), LoRA on all linear layers of
the decoder (rank, alpha, dropout 0), AdamW, linear decay without warmup, learning rate, batch
size, one epoch, gradient accumulation 1, max length, seed, float32, and
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``.

How each number is counted:

* **real tokens** are counted once, from the dataset, the same way for every run: the length of
  each training conversation rendered with the model's chat template and tokenized, capped at
  ``--max-seq-len``. Every example is generated shorter than that, so nobody truncates or drops
  anything. Pad tokens and the pad filler of packs are not counted; prompt tokens are (they are
  attended input). **tokens/s** = real tokens / train seconds.
* **train seconds** exclude imports, model load and tokenization: the trainer's own
  ``train_runtime`` for LLaMA-Factory and the HF Trainer (the ``Trainer.train`` loop), and what
  our recipe's ``done`` event reports for ours (see ``_run_loraplex``). **process s** is the wall
  time of the whole training process, start to exit, for context.
* **peak RSS** is the training process tree's maximum resident set size from ``/usr/bin/time -v``
  (wait4's rusage), or from polling with psutil where GNU time is missing.
* **held-out loss** comes from one evaluation function (``evaluate_adapters``) for every run: load
  the base model and the run's final adapter with peft, and take the mean cross-entropy over all
  assistant tokens (the chat template's generation mask: content and closing ``<|im_end|>``) of the
  held-out conversations, float32, no dropout. The untrained base model is evaluated too.
* **MFU** = model FLOPs / train seconds / measured peak. The peak is the best float32
  ``torch.matmul`` of ``--peak-size``^3 on ``--threads`` threads (2*n^3 FLOPs per product), taken
  before and after the runs; the higher of the two is used. Model FLOPs are those a LoRA step
  needs on the real tokens only, with no recomputation: for each example of length L,
  ``L * (4 * N_frozen + 6 * N_lora) + 6 * layers * d_attn * L^2``. ``N_frozen`` counts every
  frozen matmul weight a token passes through (q/k/v/o, gate/up/down, lm_head; the embedding
  lookup is not a matmul): forward 2N, backward to the activations 2N, no weight gradient.
  ``N_lora`` (the A and B matrices) also get their weight gradient: 6N. Causal attention's two
  L x L products cost ``2 * L^2 * d_attn`` per layer forward and twice that backward. Padding,
  pack filler, attention across packed examples and gradient checkpointing's second forward are
  work a run chooses to do, not model FLOPs, so they lower that run's MFU.

Verdicts: ours / LF default >= 1.5x and ours / LF packing >= 1.0x in tokens/s; "held-out loss no
worse" passes when ours <= reference * (1 + ``--loss-tolerance``) (default 2%, the spread seen
between runs that differ only in batch composition) for every LLaMA-Factory run it is compared
with.

Run it from the repository root (about 15 minutes on 2 cores; ``--quick``: about 3):

    .venv/bin/python bench/train_throughput.py [--quick] [--json PATH] [--runs a,b,...]

The temporary directory (model, data, adapters, logs, datasets cache) is removed at the end, also
on failure or Ctrl-C, unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LF_VENV_DEFAULT = ROOT / ".venv-llamafactory"
LF_ENV_SCRIPT = ROOT / "bench" / "lf_env.sh"
ALL_RUNS = ("lf_default", "lf_packing", "lf_neat_packing", "hf_padding", "loraplex")
RUN_LABELS = {
    "lf_default": "LLaMA-Factory 0.9.5, default (padding)",
    "lf_packing": "LLaMA-Factory 0.9.5, packing",
    "lf_neat_packing": "LLaMA-Factory 0.9.5, neat_packing",
    "hf_padding": "HF Trainer + peft, padding",
    "loraplex": "loraplex recipe",
}
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You answer questions about the town and its people.",
    "You are a careful assistant. Answer briefly and exactly.",
)


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters every run gets."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    learning_rate: float = 1e-3
    batch_size: int = 8
    epochs: int = 1
    max_seq_len: int = 1024
    seed: int = 42
    threads: int = 2


@dataclass(frozen=True)
class DataShape:
    """The generated dataset: token lengths are log-normal, capped below max_seq_len."""

    train_examples: int = 1200
    heldout_examples: int = 100
    median_tokens: int = 160
    sigma: float = 0.75
    min_tokens: int = 24
    multi_turn_fraction: float = 0.25
    seed: int = 1234


@dataclass
class RunResult:
    name: str
    label: str
    status: str = "pending"  # ok | failed | skipped | pending
    note: str = ""
    train_seconds: float | None = None
    process_seconds: float | None = None
    peak_rss_mib: float | None = None
    cpu_percent: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    train_loss: float | None = None
    heldout_loss: float | None = None
    steps: int | None = None
    reported: dict[str, Any] = field(default_factory=dict)
    adapter_dir: str | None = None
    log_path: str | None = None


# ---------------------------------------------------------------------------------------------
# Dataset


def _corpus_sentences() -> list[str]:
    from workers.training.tiny_model import CORPUS_PATH

    text = CORPUS_PATH.read_text(encoding="utf-8")
    sentences: list[str] = []
    for line in text.splitlines():
        for piece in re.split(r"(?<=[.!?])\s+", line.strip()):
            piece = piece.strip()
            if len(piece) > 3:
                sentences.append(piece)
    return sentences


def generate_conversations(tokenizer: Any, shape: DataShape, max_seq_len: int) -> list[dict]:
    """Deterministic chat conversations whose rendered token lengths are log-normal.

    Each conversation: a system message, then one turn (or two, for ``multi_turn_fraction`` of
    them) of a user message and an assistant answer, filled with sentences of the corpus the
    tokenizer was trained on until the conversation reaches its drawn length. About a third of
    the assistant turns repeat the user's text (a task the model can learn in one epoch), the
    rest continue the corpus.
    """
    rng = random.Random(shape.seed)
    sentences = _corpus_sentences()
    # Sentence lengths with their leading space: byte-level BPE splits at the space, so they add.
    sent_tokens = [len(tokenizer.encode(" " + s, add_special_tokens=False)) for s in sentences]
    total = shape.train_examples + shape.heldout_examples
    cap = max_seq_len - 8
    conversations: list[dict] = []
    mu = math.log(shape.median_tokens)
    while len(conversations) < total:
        target = round(rng.lognormvariate(mu, shape.sigma))
        target = max(shape.min_tokens, min(cap, target))
        turns = 2 if rng.random() < shape.multi_turn_fraction else 1
        system = rng.choice(SYSTEM_PROMPTS)
        # Budget per turn: overhead of markers is ~6 tokens per message.
        budget = max(8, (target - 8 - 12 * turns) // turns)
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        for _ in range(turns):
            kind = rng.random()
            user_budget = max(4, int(budget * rng.uniform(0.25, 0.6)))
            if kind < 0.33:
                user_budget = budget // 2
            user, used = _fill(rng, sentences, sent_tokens, user_budget)
            if kind < 0.33:
                messages.append({"role": "user", "content": "Repeat exactly: " + user})
                messages.append({"role": "assistant", "content": user})
            else:
                prompt = rng.choice(("Continue the story: ", "Tell me more. ", "Go on: ", ""))
                messages.append({"role": "user", "content": prompt + user})
                answer, _ = _fill(rng, sentences, sent_tokens, max(4, budget - used))
                messages.append({"role": "assistant", "content": answer})
        n = len(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
        if n > cap:
            continue  # redraw: nobody may truncate or drop an example
        conversations.append({"messages": messages})
    return conversations


def _fill(
    rng: random.Random, sentences: list[str], sent_tokens: list[int], budget: int
) -> tuple[str, int]:
    start = rng.randrange(len(sentences))
    out: list[str] = []
    used = 0
    i = start
    while not out or used + sent_tokens[i % len(sentences)] <= budget:
        out.append(sentences[i % len(sentences)])
        used += sent_tokens[i % len(sentences)]
        i += 1
        if rng.random() < 0.1:  # jump elsewhere in the corpus now and then
            i = rng.randrange(len(sentences))
    return " ".join(out), used


def write_datasets(conversations: list[dict], shape: DataShape, data_dir: Path) -> dict[str, Path]:
    """OpenAI chat JSONL for us and HF; the same messages as sharegpt JSON for LLaMA-Factory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    train = conversations[: shape.train_examples]
    heldout = conversations[shape.train_examples :]
    paths = {
        "train_jsonl": data_dir / "train.jsonl",
        "heldout_jsonl": data_dir / "heldout.jsonl",
        "lf_dir": data_dir / "lf",
    }
    for key, rows in (("train_jsonl", train), ("heldout_jsonl", heldout)):
        with paths[key].open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lf_dir = paths["lf_dir"]
    lf_dir.mkdir()
    (lf_dir / "bench_train.json").write_text(json.dumps(train, ensure_ascii=False))
    info = {
        "bench_train": {
            "file_name": "bench_train.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (lf_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    # Both files must hold the very same conversations.
    ours = [json.loads(line) for line in paths["train_jsonl"].read_text().splitlines()]
    theirs = json.loads((lf_dir / "bench_train.json").read_text())
    if ours != theirs:
        raise RuntimeError("the JSONL and the LLaMA-Factory JSON differ")
    return paths


def encode_chat(tokenizer: Any, messages: list[dict], max_seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels (-100 outside the assistant mask), capped at max_seq_len."""
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(enc["input_ids"])[:max_seq_len]
    mask = list(enc["assistant_masks"])[:max_seq_len]
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def dataset_lengths(tokenizer: Any, conversations: list[dict], max_seq_len: int) -> list[int]:
    return [
        len(encode_chat(tokenizer, c["messages"], max_seq_len)["input_ids"]) for c in conversations
    ]


# ---------------------------------------------------------------------------------------------
# FLOPs and the matmul peak


def model_flop_counts(model_dir: Path, rank: int) -> dict[str, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    # (in, out) of every linear layer of one decoder block; LoRA targets all of them.
    linears = [
        (h, heads * hd),  # q
        (h, kv * hd),  # k
        (h, kv * hd),  # v
        (heads * hd, h),  # o
        (h, inter),  # gate
        (h, inter),  # up
        (inter, h),  # down
    ]
    frozen = layers * sum(i * o for i, o in linears) + h * vocab  # + lm_head
    lora = layers * sum(rank * (i + o) for i, o in linears)
    return {"n_frozen": frozen, "n_lora": lora, "layers": layers, "d_attn": heads * hd}


def model_flops(lengths: list[int], counts: dict[str, int]) -> float:
    per_token = 4 * counts["n_frozen"] + 6 * counts["n_lora"]
    attn = 6 * counts["layers"] * counts["d_attn"]
    return float(sum(n * per_token + attn * n * n for n in lengths))


def matmul_peak(threads: int, size: int, repeats: int = 15) -> float:
    """Best float32 matmul FLOP/s on ``threads`` threads, in a fresh process."""
    code = (
        "import time, torch, json, sys\n"
        f"torch.set_num_threads({threads}); n = {size}\n"
        "a = torch.randn(n, n); b = torch.randn(n, n); c = torch.empty(n, n)\n"
        "for _ in range(3): torch.matmul(a, b, out=c)\n"
        "best = float('inf')\n"
        f"for _ in range({repeats}):\n"
        "    t = time.perf_counter(); torch.matmul(a, b, out=c); best = min(best, time.perf_counter() - t)\n"
        "print(json.dumps({'flops': 2 * n ** 3 / best}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_child_env(threads),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["flops"])


# ---------------------------------------------------------------------------------------------
# Child processes, timed and measured


def _child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "WANDB_DISABLED": "true",
            "DISABLE_VERSION_CHECK": "1",
        }
    )
    env.pop("VIRTUAL_ENV", None)
    env.update(extra or {})
    return env


@dataclass
class ProcResult:
    rc: int
    seconds: float
    peak_rss_mib: float | None
    cpu_percent: float | None
    stdout: str


def run_measured(
    cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, timeout: float
) -> ProcResult:
    """Run one training process; wall time, peak RSS and CPU% of its whole process tree."""
    gnu_time = Path("/usr/bin/time")
    time_file = log_path.with_suffix(".time")
    full = [str(gnu_time), "-v", "-o", str(time_file), *cmd] if gnu_time.exists() else cmd
    peak_polled = [0]
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        stop = threading.Event()
        if not gnu_time.exists():
            threading.Thread(
                target=_poll_rss, args=(proc.pid, peak_polled, stop), daemon=True
            ).start()
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            log.write(f"\n[bench] killed after {timeout:.0f} s\n")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            stop.set()
        seconds = time.perf_counter() - t0
        log.write("\n[bench] stdout:\n" + stdout)
    rss = cpu = None
    if time_file.exists():
        text = time_file.read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        rss = int(m.group(1)) / 1024 if m else None
        m = re.search(r"Percent of CPU this job got: (\d+)%", text)
        cpu = float(m.group(1)) if m else None
    elif peak_polled[0]:
        rss = peak_polled[0] / 2**20
    return ProcResult(proc.returncode, seconds, rss, cpu, stdout)


def _poll_rss(pid: int, peak: list[int], stop: threading.Event) -> None:
    import psutil

    while not stop.is_set():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        stop.wait(0.05)


# ---------------------------------------------------------------------------------------------
# The runs


@dataclass
class Context:
    tmp: Path
    model_dir: Path
    paths: dict[str, Path]
    hyper: Hyper
    lf_venv: Path
    timeout: float
    train_examples: int


def _run_llamafactory(ctx: Context, result: RunResult, variant: str) -> None:
    h = ctx.hyper
    out = ctx.tmp / "runs" / result.name
    lines = {
        "model_name_or_path": str(ctx.model_dir),
        "stage": "sft",
        "do_train": "true",
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": h.rank,
        "lora_alpha": h.alpha,
        "lora_dropout": h.dropout,
        "dataset": "bench_train",
        "dataset_dir": str(ctx.paths["lf_dir"]),
        "template": "qwen",
        "cutoff_len": h.max_seq_len,
        "overwrite_cache": "true",
        "output_dir": str(out),
        "overwrite_output_dir": "true",
        "logging_steps": 10,
        "save_strategy": "no",
        "plot_loss": "false",
        "per_device_train_batch_size": h.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": h.learning_rate,
        "num_train_epochs": float(h.epochs),
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "bf16": "false",
        "fp16": "false",
        "use_cpu": "true",
        "seed": h.seed,
        "data_seed": h.seed,
        "report_to": "none",
        "disable_tqdm": "true",
    }
    if variant == "packing":
        lines["packing"] = "true"
    elif variant == "neat_packing":
        lines["neat_packing"] = "true"
    cfg = ctx.tmp / f"{result.name}.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    cli = ctx.lf_venv / "bin" / "llamafactory-cli"
    env = _child_env(
        h.threads,
        {
            "HF_HOME": str(ctx.tmp / "hf_home"),
            "HF_DATASETS_CACHE": str(ctx.tmp / "hf_home" / "datasets"),
            "VIRTUAL_ENV": str(ctx.lf_venv),
            "PATH": f"{ctx.lf_venv / 'bin'}:{os.environ.get('PATH', '')}",
            "FORCE_TORCHRUN": "0",
        },
    )
    proc = _measured(ctx, result, [str(cli), "train", str(cfg)], env)
    if proc.rc != 0:
        result.status, result.note = "failed", f"exit {proc.rc}; see log"
        return
    metrics = json.loads((out / "train_results.json").read_text())
    result.train_seconds = float(metrics["train_runtime"])
    result.train_loss = metrics.get("train_loss")
    state = json.loads((out / "trainer_state.json").read_text())
    result.steps = state.get("global_step")
    result.reported = {k: metrics[k] for k in metrics if k != "epoch"}
    result.adapter_dir = str(out)
    result.status = "ok"


def _run_hf(ctx: Context, result: RunResult) -> None:
    h = ctx.hyper
    out = ctx.tmp / "runs" / result.name
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child_hf",
        json.dumps(
            {
                "model": str(ctx.model_dir),
                "train": str(ctx.paths["train_jsonl"]),
                "out": str(out),
                "hyper": asdict(h),
            }
        ),
    ]
    env = _child_env(h.threads, {"HF_HOME": str(ctx.tmp / "hf_home")})
    proc = _measured(ctx, result, cmd, env)
    if proc.rc != 0:
        result.status, result.note = "failed", f"exit {proc.rc}; see log"
        return
    final = _last_json(proc.stdout, "result")
    result.train_seconds = float(final["train_runtime"])
    result.train_loss = final.get("train_loss")
    result.steps = final.get("steps")
    result.reported = final
    result.adapter_dir = str(out)
    result.status = "ok"


def _run_loraplex(ctx: Context, result: RunResult) -> None:
    """Our recipe: ``python -m workers.training.run SPEC.json``, events on stdout."""
    try:
        from workers.training import run as _run_module  # noqa: F401
        from workers.training.spec import TrainingSpec  # noqa: F401
    except ImportError as exc:
        result.status, result.note = "pending", f"recipe not importable: {exc}"
        return
    result.status, result.note = "pending", "recipe runner not wired yet"


def _measured(ctx: Context, result: RunResult, cmd: list[str], env: dict[str, str]) -> ProcResult:
    log_path = ctx.tmp / "logs" / f"{result.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result.log_path = str(log_path)
    print(f"[bench] {result.name}: training ...", flush=True)
    proc = run_measured(cmd, env=env, cwd=ctx.tmp, log_path=log_path, timeout=ctx.timeout)
    result.process_seconds = proc.seconds
    result.peak_rss_mib = proc.peak_rss_mib
    result.cpu_percent = proc.cpu_percent
    if proc.rc != 0:
        tail = log_path.read_text()[-3000:]
        print(f"[bench] {result.name} failed (exit {proc.rc}); log tail:\n{tail}", flush=True)
    return proc


def _last_json(stdout: str, event: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if obj.get("event") == event:
                    return obj  # type: ignore[no-any-return]
    raise RuntimeError(f"no {event!r} event in the output")


# ---------------------------------------------------------------------------------------------
# Child: plain HF Trainer + peft with padding


def child_hf(params: dict[str, Any]) -> None:
    h = Hyper(**params["hyper"])
    import torch

    torch.set_num_threads(h.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(params["model"])
    rows = [json.loads(line) for line in Path(params["train"]).read_text().splitlines()]
    features = [encode_chat(tokenizer, r["messages"], h.max_seq_len) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(
        params["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = LoraConfig(
        r=h.rank,
        lora_alpha=h.alpha,
        lora_dropout=h.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=params["out"],
        per_device_train_batch_size=h.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=h.learning_rate,
        num_train_epochs=h.epochs,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=h.seed,
        data_seed=h.seed,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
    out = trainer.train()
    model.save_pretrained(params["out"])
    final = {
        "event": "result",
        "train_runtime": out.metrics["train_runtime"],
        "train_loss": out.metrics.get("train_loss"),
        "steps": out.global_step,
    }
    print(json.dumps(final), flush=True)


# ---------------------------------------------------------------------------------------------
# The one evaluation function


def evaluate_adapters(
    model_dir: Path, adapters: dict[str, str | None], heldout: Path, hyper: Hyper
) -> dict[str, float]:
    """Mean assistant-token loss of base + each adapter on the held-out set, in a fresh process."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child_eval",
        json.dumps(
            {
                "model": str(model_dir),
                "adapters": adapters,
                "heldout": str(heldout),
                "hyper": asdict(hyper),
            }
        ),
    ]
    out = subprocess.run(
        cmd, env=_child_env(hyper.threads), capture_output=True, text=True, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError(f"evaluation failed:\n{out.stderr[-3000:]}")
    return _last_json(out.stdout, "eval")["losses"]  # type: ignore[no-any-return]


def child_eval(params: dict[str, Any]) -> None:
    h = Hyper(**params["hyper"])
    import torch

    torch.set_num_threads(h.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(params["model"])
    rows = [json.loads(line) for line in Path(params["heldout"]).read_text().splitlines()]
    features = [encode_chat(tokenizer, r["messages"], h.max_seq_len) for r in rows]
    losses: dict[str, float] = {}
    for name, adapter in params["adapters"].items():
        model = AutoModelForCausalLM.from_pretrained(
            params["model"], dtype=torch.float32, attn_implementation="sdpa"
        )
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        losses[name] = _heldout_loss(model, features, tokenizer.pad_token_id)
        del model
    print(json.dumps({"event": "eval", "losses": losses}), flush=True)


def _heldout_loss(model: Any, features: list[dict], pad_id: int, batch: int = 8) -> float:
    import torch
    import torch.nn.functional as F

    total = 0.0
    count = 0
    with torch.no_grad():
        for i in range(0, len(features), batch):
            chunk = features[i : i + batch]
            width = max(len(f["input_ids"]) for f in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            lab = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, f in enumerate(chunk):
                n = len(f["input_ids"])
                ids[j, :n] = torch.tensor(f["input_ids"])
                att[j, :n] = 1
                lab[j, :n] = torch.tensor(f["labels"])
            logits = model(input_ids=ids, attention_mask=att).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = lab[:, 1:].reshape(-1)
            total += F.cross_entropy(
                shift_logits, shift_labels, ignore_index=-100, reduction="sum"
            ).item()
            count += int((shift_labels != -100).sum())
    return total / count


# ---------------------------------------------------------------------------------------------
# Report


def verdicts(results: dict[str, RunResult], tolerance: float) -> list[dict[str, Any]]:
    ours = results.get("loraplex")
    out: list[dict[str, Any]] = []
    for ref, target in (("lf_default", 1.5), ("lf_packing", 1.0)):
        other = results.get(ref)
        row: dict[str, Any] = {"name": f"tokens/s: ours / {ref}", "target": f">= {target}x"}
        if ours and other and ours.tokens_per_second and other.tokens_per_second:
            ratio = ours.tokens_per_second / other.tokens_per_second
            row.update(value=f"{ratio:.2f}x", ratio=ratio, passed=ratio >= target)
        else:
            row.update(value="n/a", passed=None)
        out.append(row)
    for ref in ("lf_default", "lf_packing", "lf_neat_packing"):
        other = results.get(ref)
        row = {
            "name": f"held-out loss: ours vs {ref}",
            "target": f"<= {ref} * {1 + tolerance:.2f}",
        }
        if ours and other and ours.heldout_loss is not None and other.heldout_loss is not None:
            limit = other.heldout_loss * (1 + tolerance)
            row.update(
                value=f"{ours.heldout_loss:.4f} vs {other.heldout_loss:.4f}",
                passed=ours.heldout_loss <= limit,
            )
        elif other and other.status == "ok":
            row.update(value="n/a", passed=None)
        else:
            continue
        out.append(row)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(results: dict[str, RunResult], base_loss: float | None) -> str:
    head = (
        "| run | real tok/s | train s | process s | steps | peak RSS MiB | CPU % | MFU "
        "| train loss | held-out loss |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results.values():
        if r.status != "ok":
            rows.append(f"| {r.label} | {r.status}: {r.note} | | | | | | | | |")
            continue
        rows.append(
            f"| {r.label} | {_fmt(r.tokens_per_second, '.0f')} | {_fmt(r.train_seconds, '.1f')} "
            f"| {_fmt(r.process_seconds, '.1f')} | {r.steps if r.steps is not None else 'n/a'} "
            f"| {_fmt(r.peak_rss_mib, '.0f')} | {_fmt(r.cpu_percent, '.0f')} "
            f"| {_fmt(None if r.mfu is None else 100 * r.mfu, '.1f')}% "
            f"| {_fmt(r.train_loss, '.4f')} | {_fmt(r.heldout_loss, '.4f')} |"
        )
    if base_loss is not None:
        rows.append(f"| base model, untrained | | | | | | | | | {base_loss:.4f} |")
    return head + "\n".join(rows) + "\n"


def markdown_verdicts(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | target | value | verdict |", "|---|---|---|---|"]
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "pending"}[r["passed"]]
        lines.append(f"| {r['name']} | {r['target']} | {r['value']} | {verdict} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def ensure_lf_venv(venv: Path) -> None:
    print(f"[bench] checking the LLaMA-Factory venv ({venv.name}) ...", flush=True)
    subprocess.run(["bash", str(LF_ENV_SCRIPT), str(venv)], check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="loraplex-train-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] kept {path}", flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: 100 examples, ~3 minutes")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--runs", default=",".join(ALL_RUNS), help=f"subset of {','.join(ALL_RUNS)}")
    p.add_argument("--examples", type=int, help="training examples (default 1200; quick 100)")
    p.add_argument("--heldout", type=int, help="held-out examples (default 100; quick 20)")
    p.add_argument("--median-tokens", type=int, default=DataShape.median_tokens)
    p.add_argument("--sigma", type=float, default=DataShape.sigma)
    p.add_argument("--rank", type=int, default=Hyper.rank)
    p.add_argument("--alpha", type=int, default=Hyper.alpha)
    p.add_argument("--lr", type=float, default=Hyper.learning_rate)
    p.add_argument("--batch-size", type=int, default=Hyper.batch_size)
    p.add_argument("--max-seq-len", type=int, default=Hyper.max_seq_len)
    p.add_argument("--seed", type=int, default=Hyper.seed)
    p.add_argument("--threads", type=int, default=Hyper.threads)
    p.add_argument("--peak-size", type=int, default=1024)
    p.add_argument("--loss-tolerance", type=float, default=0.02)
    p.add_argument("--lf-venv", type=Path, default=LF_VENV_DEFAULT)
    p.add_argument("--timeout", type=float, default=1200, help="per training run, seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(ALL_RUNS)
    if unknown:
        raise SystemExit(f"unknown runs: {sorted(unknown)}")
    shape = DataShape(
        train_examples=args.examples or (100 if args.quick else DataShape.train_examples),
        heldout_examples=args.heldout or (20 if args.quick else DataShape.heldout_examples),
        median_tokens=args.median_tokens,
        sigma=args.sigma,
    )
    hyper = Hyper(
        rank=args.rank,
        alpha=args.alpha,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        threads=args.threads,
    )
    started = time.time()
    if any(r.startswith("lf_") for r in runs):
        ensure_lf_venv(args.lf_venv)

    with temp_dir(args.keep) as tmp:
        import torch  # noqa: F401  (fail early if the venv lacks it)
        from transformers import AutoTokenizer

        from workers.training.tiny_model import build_tiny_model

        print("[bench] building the bench model and the dataset ...", flush=True)
        model_dir = build_tiny_model(tmp / "model", preset="bench")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        conversations = generate_conversations(tokenizer, shape, hyper.max_seq_len)
        paths = write_datasets(conversations, shape, tmp / "data")
        train_lengths = dataset_lengths(
            tokenizer, conversations[: shape.train_examples], hyper.max_seq_len
        )
        heldout_lengths = dataset_lengths(
            tokenizer, conversations[shape.train_examples :], hyper.max_seq_len
        )
        real_tokens = sum(train_lengths)
        counts = model_flop_counts(model_dir, hyper.rank)
        flops_total = model_flops(train_lengths, counts) * hyper.epochs
        srt = sorted(train_lengths)
        data_stats = {
            "train_examples": len(train_lengths),
            "heldout_examples": len(heldout_lengths),
            "real_tokens_per_epoch": real_tokens,
            "len_min": srt[0],
            "len_median": srt[len(srt) // 2],
            "len_mean": real_tokens / len(srt),
            "len_p90": srt[int(0.9 * (len(srt) - 1))],
            "len_max": srt[-1],
            "median_tokens_drawn": shape.median_tokens,
            "sigma": shape.sigma,
        }
        print(f"[bench] data: {json.dumps(data_stats)}", flush=True)
        print(f"[bench] model: {json.dumps(counts)}", flush=True)

        peak_before = matmul_peak(hyper.threads, args.peak_size)
        print(f"[bench] matmul peak (fp32, before): {peak_before / 1e9:.1f} GFLOP/s", flush=True)

        ctx = Context(
            tmp=tmp,
            model_dir=model_dir,
            paths=paths,
            hyper=hyper,
            lf_venv=args.lf_venv,
            timeout=args.timeout,
            train_examples=shape.train_examples,
        )
        results: dict[str, RunResult] = {}
        for name in runs:
            result = RunResult(name=name, label=RUN_LABELS[name])
            results[name] = result
            try:
                if name == "lf_default":
                    _run_llamafactory(ctx, result, "default")
                elif name == "lf_packing":
                    _run_llamafactory(ctx, result, "packing")
                elif name == "lf_neat_packing":
                    _run_llamafactory(ctx, result, "neat_packing")
                elif name == "hf_padding":
                    _run_hf(ctx, result)
                elif name == "loraplex":
                    _run_loraplex(ctx, result)
            except Exception as exc:
                result.status, result.note = "failed", f"{type(exc).__name__}: {exc}"
                print(f"[bench] {name} failed: {result.note}", flush=True)
            if result.status == "ok" and result.train_seconds:
                result.tokens_per_second = real_tokens * hyper.epochs / result.train_seconds
                print(
                    f"[bench] {name}: {result.tokens_per_second:.0f} real tok/s, "
                    f"train {result.train_seconds:.1f} s, process {result.process_seconds:.1f} s, "
                    f"peak RSS {result.peak_rss_mib} MiB",
                    flush=True,
                )

        peak_after = matmul_peak(hyper.threads, args.peak_size)
        peak = max(peak_before, peak_after)
        print(f"[bench] matmul peak (fp32, after): {peak_after / 1e9:.1f} GFLOP/s", flush=True)
        for r in results.values():
            if r.status == "ok" and r.train_seconds:
                r.mfu = flops_total / r.train_seconds / peak

        print("[bench] evaluating every adapter on the held-out set ...", flush=True)
        adapters: dict[str, str | None] = {"base": None}
        adapters.update({n: r.adapter_dir for n, r in results.items() if r.status == "ok"})
        losses = evaluate_adapters(model_dir, adapters, paths["heldout_jsonl"], hyper)
        for name, loss in losses.items():
            if name in results:
                results[name].heldout_loss = loss
        base_loss = losses.get("base")

        checks = verdicts(results, args.loss_tolerance)
        table = markdown_table(results, base_loss)
        ratios = markdown_verdicts(checks)
        elapsed = time.time() - started
        print()
        print(table)
        print(ratios)
        print(
            f"real tokens/epoch {real_tokens}; model FLOPs/epoch {flops_total / 1e12:.3f} TFLOP; "
            f"matmul peak {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, "
            f"after {peak_after / 1e9:.1f}); total bench time {elapsed:.0f} s"
        )
        if args.json:
            report = {
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "hyper": asdict(hyper),
                "data": data_stats,
                "model": counts,
                "model_flops_per_epoch": flops_total,
                "matmul_peak_flops": {"before": peak_before, "after": peak_after, "used": peak},
                "base_heldout_loss": base_loss,
                "loss_tolerance": args.loss_tolerance,
                "runs": {
                    n: {k: v for k, v in asdict(r).items() if k not in ("adapter_dir", "log_path")}
                    for n, r in results.items()
                },
                "checks": checks,
                "elapsed_seconds": elapsed,
                "quick": args.quick,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"[bench] wrote {args.json}")
    failed = [r.name for r in results.values() if r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_child_hf":
        child_hf(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "_child_eval":
        child_eval(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
