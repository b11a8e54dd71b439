"""Training throughput: loraplex's SFT recipe against LLaMA-Factory and plain HF, side by side.

Quality bar (DESIGN §11): real (non-pad) tokens/s of our SFT >= 1.5x LLaMA-Factory 0.9.5 with
default settings and >= 1.0x LLaMA-Factory with packing, same model, data, hyperparameters and
machine; held-out loss no worse; MFU reported against a matmul peak measured in the same run.

One invocation trains, one after the other (never two at once), on the same CPU threads:

* ``lf_default``: LLaMA-Factory 0.9.5 with its default settings: padding to the longest example
  of each batch (to a multiple of 8), and gradient checkpointing, which it turns on by default.
* ``lf_packing``: the same with ``packing: true``. Greedy knapsack packs of ``cutoff_len``
  tokens, padded to ``cutoff_len``. Packed examples attend to each other, and a batch is
  ``batch_size`` packs, so an epoch has far fewer optimizer steps.
* ``lf_neat_packing``: the same with ``neat_packing: true``: a block-diagonal 4-D mask, so packed
  examples do not attend to each other.
* ``hf_padding``: plain ``transformers.Trainer`` + peft, written below. Labels come from the chat
  template's assistant mask, and each batch is padded to its longest example
  (``DataCollatorForSeq2Seq``).
* ``loraplex``: our recipe, ``python -m workers.training.run SPEC.json`` with ``dtype:
  float32``, like the others.
* ``loraplex_auto``: the same with ``dtype: auto``, the recipe's default. On a CPU with
  avx512_bf16 that means bf16 autocast. It is reported, but it is not the gated comparison,
  because every peer runs in float32.

LLaMA-Factory is a peer, not a dependency. It runs through its own CLI in its own venv
(``.venv-llamafactory``), which ``bench/lf_env.sh`` creates if it is missing. Everything else runs
in the venv that runs this script.

What every run gets:

* the same base model: ``build_tiny_model(preset="bench")``, hidden 512, 8 layers, GQA with 8/4
  heads of 64;
* the same conversations, generated here from a seed. They are written once as OpenAI chat JSONL
  and once as the same messages in a LLaMA-Factory ``sharegpt`` JSON file with a
  ``dataset_info.json``. Every conversation has a system message, so LLaMA-Factory's ``qwen``
  template adds no default one and renders the same ChatML text as ours;
* LoRA on all linear layers of the decoder (rank, alpha, dropout 0);
* AdamW (``adamw_torch``), linear decay with no warmup, max grad norm 1, the same learning rate,
  batch size, max length and seed, one epoch, gradient accumulation 1, float32;
* the same threads: ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``--threads``;
* the same ``OMP_WAIT_POLICY`` (``--omp-wait-policy``, default PASSIVE). Our recipe sets PASSIVE
  for itself unless told otherwise. On a machine that other processes share, threads that spin
  while they wait lose several times their speed. With one value for everyone, the comparison is
  about the training code, not about how each tool copes with its neighbours.

How each number is counted:

* **real tokens** are counted once, from the dataset, the same way for every run: each training
  conversation is rendered with the model's chat template and tokenized, and its length is capped
  at ``--max-seq-len``. Every example is generated shorter than that, so no run truncates or drops
  anything. Pad tokens and the filler that pads out packs are not counted. Prompt tokens are,
  because they are attended input. **tokens/s** = real tokens / train seconds.
* **train seconds** leave out imports, model load and tokenization. For LLaMA-Factory and the HF
  Trainer they are the trainer's own ``train_runtime`` (the ``Trainer.train`` loop). Our recipe's
  ``done`` event reports seconds since its process started, so for it the script times the event
  stream instead: from the arrival of ``started`` (sent from ``on_train_begin``, where the HF
  Trainer starts its clock) to the arrival of the last ``metrics`` event. **process s** is the
  wall time of the whole training process, start to exit.
* **tok/s per CPU** and **train cores**: a poller records the CPU seconds of the training process
  tree every 0.2 s. The start of the training loop is known from a log line (LLaMA-Factory's
  ``***** Running training *****``, a marker printed by the HF child, our ``started`` event).
  From those, the script reads the CPU the loop got (train cores = CPU s / train s). **tok/s per
  CPU** = real tokens / (CPU s / threads): the rate if the run had kept its threads busy. It
  holds up better than wall time when other processes take cores. **others' cores** is what the
  rest of the machine used during the loop (/proc/stat).
* **peak RSS** is the largest resident set of the training process tree, from ``/usr/bin/time
  -v``, or from psutil polling where GNU time is missing.
* **held-out loss** comes from one evaluation function (``evaluate_adapters``) for every run. It
  loads the base model plus the run's final adapter with peft. It then takes the mean
  cross-entropy over all assistant tokens (the template's generation mask: the content and the
  closing ``<|im_end|>``) of the held-out conversations, weighted by token, float32, no dropout.
  The untrained base model is evaluated too. **last train loss** is the loss of each run's last
  logging window (10 steps), as the trainers log it. It is n/a where an epoch has fewer than 10
  steps.
* **MFU** = model FLOPs / train seconds / peak. The peak is the best ``torch.matmul`` of
  ``--peak-size``^3 on ``--threads`` threads (2 n^3 FLOPs per product), taken over 4 s before and
  after the runs, on a quiet machine where possible. The higher value counts. float32 runs are
  held to the float32 peak, and a run that computed in bf16 to the bf16 peak. Model FLOPs are the
  ones a LoRA step needs on the real tokens alone, with no recomputation. For each example of
  length L they are ``L * (4 * N_frozen + 6 * N_lora) + 6 * layers * d_attn * L^2``:
  * ``N_frozen`` counts every frozen matmul weight a token passes through (q/k/v/o,
    gate/up/down, lm_head; the embedding lookup is not a matmul). Each costs 2N forward and 2N
    backward to the activations, with no weight gradient.
  * ``N_lora`` (the A and B matrices) also get a weight gradient, so 6N.
  * Causal attention's two L x L products cost ``2 * L^2 * d_attn`` per layer forward, and twice
    that backward.

  Padding, pack filler, attention across packed examples and gradient checkpointing's second
  forward are work a run chooses to do. They are not model FLOPs, so they lower that run's MFU.

Verdicts, for ``loraplex``, and for ``loraplex_auto`` when it ran:

* tokens/s: ours / LF default >= 1.5x, and ours / LF packing >= 1.0x. The ratio of tok/s per CPU
  is shown next to each one.
* "held-out loss no worse": ours <= reference * (1 + ``--loss-tolerance``) against each
  LLaMA-Factory run. The default tolerance is 2%, a few times the 0.5-0.6% gap measured between
  LLaMA-Factory's default and plain HF, which do the same math on the same batches.

Run it from the repository root (about 20 minutes on 2 quiet cores, longer on a busy machine;
``--quick``: 64 examples, 3-6 minutes):

    .venv/bin/python bench/train_throughput.py [--quick] [--json PATH] [--runs a,b,...]

Before each run, and before each peak measurement, the script waits up to ``--quiet-wait``
seconds for other processes to go idle. The temporary directory (model, data, adapters, logs,
datasets cache) is removed at the end, also on failure, Ctrl-C or SIGTERM, unless ``--keep`` is
given.
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
ALL_RUNS = (
    "lf_default",
    "lf_packing",
    "lf_neat_packing",
    "hf_padding",
    "loraplex",
    "loraplex_auto",
)
RUN_LABELS = {
    "lf_default": "LLaMA-Factory 0.9.5, default (padding)",
    "lf_packing": "LLaMA-Factory 0.9.5, packing",
    "lf_neat_packing": "LLaMA-Factory 0.9.5, neat_packing",
    "hf_padding": "HF Trainer + peft, padding",
    "loraplex": "loraplex recipe, float32",
    "loraplex_auto": "loraplex recipe, dtype auto",
}
SYSTEM_PROMPTS = ("Be helpful.", "Answer briefly.", "You are a helpful assistant.")


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

    train_examples: int = 1000
    heldout_examples: int = 100
    median_tokens: int = 40
    sigma: float = 0.8
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
    other_cores: float | None = None  # cores other processes used during the training loop
    train_cpu_seconds: float | None = None  # CPU the training loop got (process tree)
    cpu_tokens_per_second: float | None = None  # real tokens per (CPU second / threads)
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


def _corpus_words() -> list[str]:
    from workers.training.tiny_model import CORPUS_PATH

    return CORPUS_PATH.read_text(encoding="utf-8").split()


def generate_conversations(tokenizer: Any, shape: DataShape, max_seq_len: int) -> list[dict]:
    """Deterministic chat conversations whose rendered token lengths are log-normal.

    Each conversation: a system message, then one turn (or two, for ``multi_turn_fraction`` of
    them) of a user message and an assistant answer, filled with runs of words from the corpus
    the tokenizer was trained on until the conversation reaches its drawn length. A third of the
    assistant turns repeat the user's text (a task the model can start to learn in one epoch),
    the rest continue the corpus. Lengths below what a system message and one short turn need
    come out at that floor; a draw that renders longer than ``max_seq_len - 8`` is drawn again,
    so that nobody truncates or drops an example.
    """
    rng = random.Random(shape.seed)
    words = _corpus_words()
    # Word lengths with their leading space: byte-level BPE splits at the space, so they add up.
    cache: dict[str, int] = {}
    word_tokens = []
    for w in words:
        if w not in cache:
            cache[w] = len(tokenizer.encode(" " + w, add_special_tokens=False))
        word_tokens.append(cache[w])
    total = shape.train_examples + shape.heldout_examples
    cap = max_seq_len - 8
    conversations: list[dict] = []
    mu = math.log(shape.median_tokens)
    while len(conversations) < total:
        target = round(rng.lognormvariate(mu, shape.sigma))
        target = max(shape.min_tokens, min(cap, target))
        turns = 2 if target > 100 and rng.random() < shape.multi_turn_fraction else 1
        system = rng.choice(SYSTEM_PROMPTS)
        kinds = [rng.random() for _ in range(turns)]
        prompts = [
            "Repeat exactly: "
            if k < 0.33
            else rng.choice(("Continue the story: ", "Tell me more. ", "Go on: ", ""))
            for k in kinds
        ]
        # What the conversation costs with empty texts: the rest of the target is content.
        skeleton = [{"role": "system", "content": system}]
        for prompt in prompts:
            skeleton += [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        overhead = _n_tokens(tokenizer, skeleton)
        budget = max(2, (target - overhead) // turns)
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        for kind, prompt in zip(kinds, prompts, strict=True):
            if kind < 0.33:
                text, _ = _fill(rng, words, word_tokens, max(1, budget // 2))
                messages.append({"role": "user", "content": prompt + text})
                messages.append({"role": "assistant", "content": text})
            else:
                user_budget = max(1, int(budget * rng.uniform(0.2, 0.6)))
                user, used = _fill(rng, words, word_tokens, user_budget)
                answer, _ = _fill(rng, words, word_tokens, max(1, budget - used))
                messages.append({"role": "user", "content": prompt + user})
                messages.append({"role": "assistant", "content": answer})
        if _n_tokens(tokenizer, messages) > cap:
            continue
        conversations.append({"messages": messages})
    return conversations


def _n_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    )


def _fill(
    rng: random.Random, words: list[str], word_tokens: list[int], budget: int
) -> tuple[str, int]:
    """A run of corpus words of about ``budget`` tokens (at least one word)."""
    i = rng.randrange(len(words))
    out: list[str] = []
    used = 0
    while not out or used + word_tokens[i] <= budget:
        out.append(words[i])
        used += word_tokens[i]
        i = (i + 1) % len(words)
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


def matmul_peak(threads: int, size: int, dtype: str = "float32", seconds: float = 4.0) -> float:
    """Best ``dtype`` matmul FLOP/s on ``threads`` threads, in a fresh process.

    The best of the products timed during ``seconds``: on a machine other processes share, the
    best one is the one that ran alone, which is the peak this measures.
    """
    code = (
        "import time, torch, json\n"
        f"torch.set_num_threads({threads}); n = {size}\n"
        f"dt = torch.{dtype}\n"
        "a = torch.randn(n, n, dtype=dt); b = torch.randn(n, n, dtype=dt)\n"
        "c = torch.empty(n, n, dtype=dt)\n"
        "for _ in range(3): torch.matmul(a, b, out=c)\n"
        "best = float('inf'); end = time.perf_counter() + " + repr(seconds) + "\n"
        "while time.perf_counter() < end:\n"
        "    t = time.perf_counter(); torch.matmul(a, b, out=c)\n"
        "    best = min(best, time.perf_counter() - t)\n"
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


# Set from --omp-wait-policy by main(); one value for every process of the run.
_OMP_WAIT_POLICY: list[str] = ["PASSIVE"]


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
    if _OMP_WAIT_POLICY[0]:
        env["OMP_WAIT_POLICY"] = _OMP_WAIT_POLICY[0]
    env.pop("VIRTUAL_ENV", None)
    env.update(extra or {})
    return env


@dataclass
class ProcResult:
    rc: int
    seconds: float
    peak_rss_mib: float | None
    cpu_percent: float | None
    lines: list[tuple[float, str]]  # stdout lines with their arrival time (s since start)
    err_lines: list[tuple[float, str]]  # the same for stderr
    # (s since start, CPU seconds of the process tree, machine busy jiffies, machine jiffies)
    samples: list[tuple[float, float, int, int]]

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first_line(self, needle: str) -> float | None:
        """Arrival time of the first stdout or stderr line containing ``needle``."""
        hits = [t for t, line in (*self.lines, *self.err_lines) if needle in line]
        return min(hits) if hits else None

    def window(self, start: float, end: float) -> tuple[float | None, float | None]:
        """(CPU seconds of the training process tree, cores others used) during [start, end]."""
        if len(self.samples) < 2 or end <= start:
            return None, None
        cpu0, busy0, total0 = _interpolate(self.samples, start)
        cpu1, busy1, total1 = _interpolate(self.samples, end)
        cpu = cpu1 - cpu0
        other = None
        if total1 > total0:
            busy_cores = (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)
            other = max(0.0, busy_cores - cpu / (end - start))
        return cpu, other


def _interpolate(
    samples: list[tuple[float, float, int, int]], t: float
) -> tuple[float, float, float]:
    before = [s for s in samples if s[0] <= t] or samples[:1]
    after = [s for s in samples if s[0] >= t] or samples[-1:]
    a, b = before[-1], after[0]
    if b[0] == a[0]:
        return a[1], float(a[2]), float(a[3])
    f = (t - a[0]) / (b[0] - a[0])
    return tuple(x + f * (y - x) for x, y in zip(a[1:], b[1:], strict=True))  # type: ignore[return-value]


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def machine_busy_cores(interval: float = 2.0) -> float:
    b0, t0 = _cpu_jiffies()
    time.sleep(interval)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def wait_until_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores; return the last load."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy_cores(1.0)
    while busy >= threshold and time.monotonic() < deadline:
        print(f"[bench] machine busy ({busy:.2f} cores used by others); waiting ...", flush=True)
        busy = machine_busy_cores(3.0)
    return busy


def run_measured(
    cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, timeout: float
) -> ProcResult:
    """Run one training process and watch it.

    Peak RSS and CPU % of the whole process tree come from GNU time (wait4's rusage); stdout and
    stderr lines are timestamped as they arrive; every 0.2 s a poller records the CPU seconds of
    the process tree and the machine's /proc/stat counters, so that the CPU the training loop
    got, and what other processes used meanwhile, can be read for any time window.
    """
    import psutil

    gnu_time = Path("/usr/bin/time")
    time_file = log_path.with_suffix(".time")
    full = [str(gnu_time), "-v", "-o", str(time_file), *cmd] if gnu_time.exists() else cmd
    peak_polled = [0]
    lines: list[tuple[float, str]] = []
    err_lines: list[tuple[float, str]] = []
    samples: list[tuple[float, float, int, int]] = []
    lock = threading.Lock()
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        stop = threading.Event()

        def _read(stream: Any, into: list[tuple[float, str]], tag: str) -> None:
            for line in stream:
                t = time.perf_counter() - t0
                into.append((t, line.rstrip("\n")))
                with lock:
                    log.write(f"{t:9.3f} {tag} {line}")

        def _poll() -> None:
            root = psutil.Process(proc.pid)
            while not stop.is_set():
                t = time.perf_counter() - t0
                try:
                    procs = [root, *root.children(recursive=True)]
                    cpu = 0.0
                    rss = 0
                    for p in procs:
                        with contextlib.suppress(psutil.Error):
                            times = p.cpu_times()
                            cpu += times.user + times.system
                            rss += p.memory_info().rss
                    peak_polled[0] = max(peak_polled[0], rss)
                except psutil.Error:
                    break
                busy, total = _cpu_jiffies()
                samples.append((t, cpu, busy, total))
                stop.wait(0.2)

        readers = [
            threading.Thread(target=_read, args=(proc.stdout, lines, "out"), daemon=True),
            threading.Thread(target=_read, args=(proc.stderr, err_lines, "err"), daemon=True),
            threading.Thread(target=_poll, daemon=True),
        ]
        for thread in readers:
            thread.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with lock:
                log.write(f"\n[bench] killed after {timeout:.0f} s\n")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            stop.set()
        seconds = time.perf_counter() - t0
        for thread in readers:
            thread.join(timeout=10)
    rss = cpu = None
    if time_file.exists():
        text = time_file.read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        rss = int(m.group(1)) / 1024 if m else None
        m = re.search(r"Percent of CPU this job got: (\d+)%", text)
        cpu = float(m.group(1)) if m else None
    elif peak_polled[0]:
        rss = peak_polled[0] / 2**20
    return ProcResult(proc.returncode, seconds, rss, cpu, lines, err_lines, samples)


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
    quiet_wait: float


def _run_llamafactory(ctx: Context, result: RunResult, variant: str) -> None:
    h = ctx.hyper
    out = ctx.tmp / "runs" / result.name
    config: dict[str, Any] = {
        "model_name_or_path": str(ctx.model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": h.rank,
        "lora_alpha": h.alpha,
        "lora_dropout": h.dropout,
        "dataset": "bench_train",
        "dataset_dir": str(ctx.paths["lf_dir"]),
        "template": "qwen",
        "cutoff_len": h.max_seq_len,
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 10,
        "save_strategy": "no",
        "plot_loss": False,
        "per_device_train_batch_size": h.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": h.learning_rate,
        "num_train_epochs": float(h.epochs),
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "seed": h.seed,
        "data_seed": h.seed,
        "report_to": "none",
        "disable_tqdm": True,
    }
    if variant == "packing":
        config["packing"] = True
    elif variant == "neat_packing":
        config["neat_packing"] = True
    # Every value as a JSON scalar (valid YAML): a bare `no` would read as False. (0.9.5's
    # JSON config path passes a Path to json.load, so YAML it is.)
    cfg = ctx.tmp / f"{result.name}.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
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
    state = json.loads((out / "trainer_state.json").read_text())
    result.train_loss = _last_logged_loss(state.get("log_history", []))
    result.steps = state.get("global_step")
    result.reported = {k: metrics[k] for k in metrics if k != "epoch"}
    _train_window(result, proc, proc.first_line("***** Running training *****"))
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
    result.train_loss = final.get("last_logged_loss")
    result.steps = final.get("steps")
    result.reported = final
    _train_window(result, proc, proc.first_line('"event": "train_begin"'))
    result.adapter_dir = str(out)
    result.status = "ok"


def _run_loraplex(ctx: Context, result: RunResult, dtype: str) -> None:
    """Our recipe: ``python -m workers.training.run SPEC.json``, JSON-line events on stdout.

    The data goes the way the worker sends it: the JSONL bytes through
    ``common.datasets.iter_examples`` into ``workers.training.data.tokenize_to_file`` (done here,
    before the timed process starts, as the worker's validation stage does). The recipe's
    ``done`` event reports ``seconds`` since its process started (imports and model load
    included), so train seconds are measured on the event stream instead: from the arrival of
    ``started`` (sent from the trainer's ``on_train_begin``, where the HF Trainer starts its
    ``train_runtime`` clock) to the arrival of the last ``metrics`` event (the last step is
    always logged). Event lines are flushed one by one, so arrival is within a millisecond.
    """
    from common.datasets import iter_examples
    from workers.training.data import tokenize_to_file
    from workers.training.spec import TrainingSpec

    h = ctx.hyper
    run_dir = ctx.tmp / "runs" / result.name
    data_dir = ctx.tmp / "loraplex_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_file = data_dir / "train.safetensors"
    valid_file = data_dir / "valid.safetensors"
    stats: dict[str, Any] = {}
    for src, dst, key in (
        (ctx.paths["train_jsonl"], train_file, "train"),
        (ctx.paths["heldout_jsonl"], valid_file, "valid"),
    ):
        if not dst.exists():
            records = iter_examples([src.read_bytes()])
            got = tokenize_to_file(
                records,
                ctx.model_dir,
                dst,
                method="sft",
                max_seq_len=h.max_seq_len,
                on_overflow="truncate",
            )
            stats[key] = {k: v for k, v in got.to_dict().items() if not isinstance(v, list)}
            stats[key]["truncated"] = len(got.truncated)
            stats[key]["skipped"] = len(got.skipped)
    spec = TrainingSpec(
        method="sft",
        base_model_path=str(ctx.model_dir),
        base_model_name="loraplex-bench-tiny",
        train_data=str(train_file),
        valid_data=str(valid_file),
        output_dir=str(run_dir / "adapter"),
        checkpoint_dir=str(run_dir / "checkpoints"),
        seed=h.seed,
        n_epochs=h.epochs,
        batch_size=h.batch_size,
        learning_rate=h.learning_rate,
        warmup_ratio=0.0,
        lora_rank=h.rank,
        lora_alpha=h.alpha,
        lora_dropout=h.dropout,
        target_modules="all-linear",
        max_seq_len=h.max_seq_len,
        packing=True,
        checkpoint_every_steps=0,
        logging_steps=10,
        dtype=dtype,
        num_threads=h.threads,
    )
    spec_path = ctx.tmp / f"{result.name}.spec.json"
    spec.save(spec_path)
    env = _child_env(h.threads, {"HF_HOME": str(ctx.tmp / "hf_home"), "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "workers.training.run", str(spec_path)]
    fingerprint = recipe_fingerprint()
    proc = _measured(ctx, result, cmd, env)
    events = []
    for t, line in proc.lines:
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "type" in obj:
                events.append((t, obj))
    errors = [e for _, e in events if e["type"] == "error"]
    if proc.rc != 0 or errors:
        message = errors[0].get("message", "") if errors else ""
        result.status, result.note = "failed", f"exit {proc.rc} {message}".strip()
        return
    started = [t for t, e in events if e["type"] == "started"]
    metrics = [(t, e) for t, e in events if e["type"] == "metrics"]
    done = [e for _, e in events if e["type"] == "done"]
    if not started or not metrics or not done:
        result.status, result.note = "failed", "missing started/metrics/done events"
        return
    result.train_seconds = metrics[-1][0] - started[0]
    _train_window(result, proc, started[0])
    final = done[-1]["metrics"]
    result.train_loss = final.get("train_loss")
    result.steps = final.get("steps")
    result.reported = {
        "started": next(e for _, e in events if e["type"] == "started"),
        "done_metrics": final,
        "window_tokens_per_second": [e.get("tokens_per_second") for _, e in metrics],
        "tokenize_stats": stats,
        "recipe_sources_sha256": fingerprint,
    }
    result.adapter_dir = str(run_dir / "adapter")
    result.status = "ok"


def _measured(ctx: Context, result: RunResult, cmd: list[str], env: dict[str, str]) -> ProcResult:
    log_path = ctx.tmp / "logs" / f"{result.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result.log_path = str(log_path)
    if ctx.quiet_wait > 0:
        wait_until_quiet(ctx.quiet_wait)
    print(f"[bench] {result.name}: training ...", flush=True)
    proc = run_measured(cmd, env=env, cwd=ctx.tmp, log_path=log_path, timeout=ctx.timeout)
    result.process_seconds = proc.seconds
    result.peak_rss_mib = proc.peak_rss_mib
    result.cpu_percent = proc.cpu_percent
    if proc.rc != 0:
        tail = log_path.read_text()[-3000:]
        print(f"[bench] {result.name} failed (exit {proc.rc}); log tail:\n{tail}", flush=True)
    return proc


def _train_window(result: RunResult, proc: ProcResult, start: float | None) -> None:
    """CPU the training loop got and the machine's other load, over [start, start + train s]."""
    if start is None or not result.train_seconds:
        return
    cpu, other = proc.window(start, start + result.train_seconds)
    result.train_cpu_seconds = cpu
    result.other_cores = other


def _last_logged_loss(history: list[dict[str, Any]]) -> float | None:
    """The training loss of the last logging window (the recipe reports the same figure)."""
    losses = [float(h["loss"]) for h in history if "loss" in h]
    return losses[-1] if losses else None


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
        TrainerCallback,
        TrainingArguments,
        set_seed,
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
    set_seed(h.seed)  # before the LoRA matrices are initialised (Trainer seeds only later)
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

    class Marker(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            print(json.dumps({"event": "train_begin"}), flush=True)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=collator,
        callbacks=[Marker()],
    )
    out = trainer.train()
    model.save_pretrained(params["out"])
    final = {
        "event": "result",
        "train_runtime": out.metrics["train_runtime"],
        "train_loss": out.metrics.get("train_loss"),
        "last_logged_loss": _last_logged_loss(trainer.state.log_history),
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


def verdicts(
    results: dict[str, RunResult], tolerance: float, ours_name: str = "loraplex"
) -> list[dict[str, Any]]:
    """The DESIGN §11 checks for ``ours_name`` against the LLaMA-Factory runs."""
    ours = results.get(ours_name)
    out: list[dict[str, Any]] = []
    for ref, target in (("lf_default", 1.5), ("lf_packing", 1.0), ("lf_neat_packing", None)):
        other = results.get(ref)
        if other is None:
            continue
        row: dict[str, Any] = {
            "ours": ours_name,
            "name": f"tokens/s: {ours_name} / {ref}",
            "target": f">= {target}x" if target else "(info)",
        }
        if ours and ours.tokens_per_second and other.tokens_per_second:
            ratio = ours.tokens_per_second / other.tokens_per_second
            passed = ratio >= target if target else "info"
            row.update(value=f"{ratio:.2f}x", ratio=ratio, passed=passed)
            if ours.cpu_tokens_per_second and other.cpu_tokens_per_second:
                cpu_ratio = ours.cpu_tokens_per_second / other.cpu_tokens_per_second
                row["cpu_ratio"] = cpu_ratio
                row["value"] += f" (per CPU: {cpu_ratio:.2f}x)"
        else:
            row.update(value="n/a", passed=None)
        out.append(row)
    for ref in ("lf_default", "lf_packing", "lf_neat_packing"):
        other = results.get(ref)
        if other is None:
            continue
        row = {
            "ours": ours_name,
            "name": f"held-out loss: {ours_name} vs {ref}",
            "target": f"<= {ref} x {1 + tolerance:.2f}",
        }
        if ours and ours.heldout_loss is not None and other.heldout_loss is not None:
            limit = other.heldout_loss * (1 + tolerance)
            row.update(
                value=f"{ours.heldout_loss:.4f} vs {other.heldout_loss:.4f}",
                passed=ours.heldout_loss <= limit,
            )
        else:
            row.update(value="n/a", passed=None)
        out.append(row)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(results: dict[str, RunResult], base_loss: float | None) -> str:
    head = (
        "| run | real tok/s | tok/s per CPU | train s | process s | steps | peak RSS MiB "
        "| train cores | others' cores | MFU | last train loss | held-out loss |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results.values():
        cores = (
            r.train_cpu_seconds / r.train_seconds
            if r.train_cpu_seconds and r.train_seconds
            else None
        )
        if r.status != "ok":
            rows.append(f"| {r.label} | {r.status}: {r.note} | | | | | | | | | | |")
            continue
        rows.append(
            f"| {r.label} | {_fmt(r.tokens_per_second, '.0f')} "
            f"| {_fmt(r.cpu_tokens_per_second, '.0f')} | {_fmt(r.train_seconds, '.1f')} "
            f"| {_fmt(r.process_seconds, '.1f')} | {r.steps if r.steps is not None else 'n/a'} "
            f"| {_fmt(r.peak_rss_mib, '.0f')} "
            f"| {_fmt(cores, '.2f')} | {_fmt(r.other_cores, '.2f')} "
            f"| {_fmt(None if r.mfu is None else 100 * r.mfu, '.1f')}% "
            f"| {_fmt(r.train_loss, '.4f')} | {_fmt(r.heldout_loss, '.4f')} |"
        )
    if base_loss is not None:
        rows.append(f"| base model, untrained | | | | | | | | | | | {base_loss:.4f} |")
    return head + "\n".join(rows) + "\n"


def markdown_verdicts(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | target | value | verdict |", "|---|---|---|---|"]
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "pending", "info": "-"}[r["passed"]]
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
    p.add_argument("--quick", action="store_true", help="smoke run: 64 examples, a few minutes")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--runs", default=",".join(ALL_RUNS), help=f"subset of {','.join(ALL_RUNS)}")
    p.add_argument("--examples", type=int, help="training examples (default 1000; quick 64)")
    p.add_argument("--heldout", type=int, help="held-out examples (default 100; quick 16)")
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
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20,
        help="before each run, wait up to this many seconds for other processes to go idle",
    )
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for every run ('' leaves it unset); see the docstring",
    )
    return p.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def recipe_fingerprint() -> str:
    """sha256 of the recipe's sources, so a report names the code it measured."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "workers" / "training").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Clean up (children killed, temporary directory removed) on Ctrl-C and on kill, also when
    # started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(ALL_RUNS)
    if unknown:
        raise SystemExit(f"unknown runs: {sorted(unknown)}")
    shape = DataShape(
        train_examples=args.examples or (64 if args.quick else DataShape.train_examples),
        heldout_examples=args.heldout or (16 if args.quick else DataShape.heldout_examples),
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
    _OMP_WAIT_POLICY[0] = args.omp_wait_policy
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

        if args.quiet_wait > 0:
            wait_until_quiet(args.quiet_wait)
        peak_before = matmul_peak(hyper.threads, args.peak_size)
        print(f"[bench] matmul peak (fp32, before): {peak_before / 1e9:.1f} GFLOP/s", flush=True)
        bf16_before = matmul_peak(hyper.threads, args.peak_size, "bfloat16")
        print(f"[bench] matmul peak (bf16, before): {bf16_before / 1e9:.1f} GFLOP/s", flush=True)

        ctx = Context(
            tmp=tmp,
            model_dir=model_dir,
            paths=paths,
            hyper=hyper,
            lf_venv=args.lf_venv,
            timeout=args.timeout,
            train_examples=shape.train_examples,
            quiet_wait=args.quiet_wait,
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
                    _run_loraplex(ctx, result, "float32")
                elif name == "loraplex_auto":
                    _run_loraplex(ctx, result, "auto")
            except Exception as exc:
                result.status, result.note = "failed", f"{type(exc).__name__}: {exc}"
                print(f"[bench] {name} failed: {result.note}", flush=True)
            if result.status == "ok" and result.train_seconds:
                result.tokens_per_second = real_tokens * hyper.epochs / result.train_seconds
                if result.train_cpu_seconds:
                    result.cpu_tokens_per_second = (
                        real_tokens * hyper.epochs / (result.train_cpu_seconds / hyper.threads)
                    )
                print(
                    f"[bench] {name}: {result.tokens_per_second:.0f} real tok/s, "
                    f"train {result.train_seconds:.1f} s, process {result.process_seconds:.1f} s, "
                    f"peak RSS {_fmt(result.peak_rss_mib, '.0f')} MiB, "
                    f"training loop got {_fmt(result.train_cpu_seconds, '.0f')} CPU s, "
                    f"others used {_fmt(result.other_cores, '.2f')} cores",
                    flush=True,
                )

        if args.quiet_wait > 0:
            wait_until_quiet(args.quiet_wait)
        peak_after = matmul_peak(hyper.threads, args.peak_size)
        peak = max(peak_before, peak_after)
        print(f"[bench] matmul peak (fp32, after): {peak_after / 1e9:.1f} GFLOP/s", flush=True)
        bf16_after = matmul_peak(hyper.threads, args.peak_size, "bfloat16")
        bf16_peak = max(bf16_before, bf16_after)
        print(f"[bench] matmul peak (bf16, after): {bf16_after / 1e9:.1f} GFLOP/s", flush=True)
        for r in results.values():
            if r.status == "ok" and r.train_seconds:
                # A run computing in bf16 (our recipe's "auto" here) is held to the bf16 peak.
                bf16 = r.reported.get("started", {}).get("dtype") == "bfloat16"
                r.mfu = flops_total / r.train_seconds / (bf16_peak if bf16 else peak)

        print("[bench] evaluating every adapter on the held-out set ...", flush=True)
        adapters: dict[str, str | None] = {"base": None}
        adapters.update({n: r.adapter_dir for n, r in results.items() if r.status == "ok"})
        losses = evaluate_adapters(model_dir, adapters, paths["heldout_jsonl"], hyper)
        for name, loss in losses.items():
            if name in results:
                results[name].heldout_loss = loss
        base_loss = losses.get("base")

        checks = verdicts(results, args.loss_tolerance)
        if "loraplex_auto" in results:
            checks += verdicts(results, args.loss_tolerance, "loraplex_auto")
        table = markdown_table(results, base_loss)
        ratios = markdown_verdicts(checks)
        elapsed = time.time() - started
        print()
        print(table)
        print(ratios)
        for name in ("loraplex", "loraplex_auto"):
            r = results.get(name)
            if r is not None and r.status == "ok":
                own = r.reported.get("done_metrics", {})
                print(
                    f"{name}: the recipe's own valid_loss {own.get('valid_loss')} vs the shared "
                    f"evaluation {r.heldout_loss}; its trained_tokens {own.get('trained_tokens')}"
                )
        print(
            f"real tokens/epoch {real_tokens}; model FLOPs/epoch {flops_total / 1e12:.3f} TFLOP; "
            f"matmul peak {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, "
            f"after {peak_after / 1e9:.1f}); bf16 matmul peak {bf16_peak / 1e9:.1f} GFLOP/s; "
            f"total bench time {elapsed:.0f} s"
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
                "bf16_matmul_peak_flops": {
                    "before": bf16_before,
                    "after": bf16_after,
                    "used": bf16_peak,
                },
                "base_heldout_loss": base_loss,
                "loss_tolerance": args.loss_tolerance,
                "runs": {
                    n: {k: v for k, v in asdict(r).items() if k not in ("adapter_dir", "log_path")}
                    for n, r in results.items()
                },
                "checks": checks,
                "elapsed_seconds": elapsed,
                "quick": args.quick,
                "recipe_sources_sha256": recipe_fingerprint(),
                "omp_wait_policy": args.omp_wait_policy,
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
