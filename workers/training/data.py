"""Tokenize validated examples with the base model's chat template, and store them for training.

The worker runs this in its validation stage (in the worker process, not the training
subprocess), records the stats, and caches the file by (dataset sha256, ``tokenizer_fingerprint``,
max_seq_len). The training recipe only ever reads the file back with ``load_tokenized``.

File format: one safetensors file (no pickle anywhere), flat arrays plus offsets.

* SFT: ``input_ids`` int32 ``[T]``, ``loss_mask`` uint8 ``[T]`` (1 = a training target),
  ``offsets`` int64 ``[N+1]``; example ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``.
* DPO: ``prompt_ids``/``chosen_ids``/``rejected_ids`` int32 with ``prompt_offsets``/
  ``chosen_offsets``/``rejected_offsets`` int64; the completions exclude the prompt.
* ``__metadata__``: format name and version, method, examples, max_seq_len, tokenizer fingerprint.

Which tokens are trained (SFT): the tokens of each assistant turn whose ``weight`` is 1, including
the end-of-turn token that closes it (so the model learns to stop), and nothing else. The exact
tokens come from the template's ``{% generation %}`` markers when it has them
(``return_assistant_tokens_mask``). Templates without markers are rendered turn by turn: an
assistant turn is the tokens between the conversation rendered up to its prompt (with the
generation prompt) and rendered up to and including the turn, cut after its last end-of-sequence
token (the newline a template prints after it is formatting, not a target). A template that renders
earlier turns differently once later turns exist cannot be split exactly and is refused.

Length limits: ``on_overflow="truncate"`` keeps the first ``max_seq_len`` tokens (SFT) or the
end of the prompt and the start of both completions (DPO: the prompt keeps at least half the
budget); ``"reject"`` leaves such examples out. Either way the stats list the input indexes.
Examples left with no trained token are left out and listed as ``skipped``.
"""

from __future__ import annotations

import hashlib
import os
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from common.datasets import DatasetFormat, to_chat_messages, to_preference

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT_NAME = "loraplex-tokenized"
# Bump when the tokenization rules change: it is part of the fingerprint, so cached files made by
# older rules are not reused.
FORMAT_VERSION = 1

Method = Literal["sft", "dpo"]
Overflow = Literal["truncate", "reject"]

# Files that decide how text becomes ids; whichever of them a model folder has go into the
# fingerprint (the chat template lives in tokenizer_config.json or chat_template.jinja).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TokenizationError(ValueError):
    """An example (or the tokenizer) cannot be tokenized as asked; the message says which."""


@dataclass(frozen=True)
class TokenizedStats:
    """What the tokenized file holds; indexes refer to the input examples, counted from 0."""

    examples: int  # examples written to the file
    total_tokens: int  # tokens in the written sequences (DPO: prompt + chosen + rejected)
    trained_tokens: int  # tokens that carry loss (SFT: weighted assistant tokens; DPO: completions)
    truncated: list[int] = field(default_factory=list)  # shortened to max_seq_len
    rejected: list[int] = field(default_factory=list)  # longer than max_seq_len, left out
    skipped: list[int] = field(default_factory=list)  # nothing to train on, left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SFTExamples:
    """Tokenized SFT examples, as read back by the recipe."""

    input_ids: npt.NDArray[np.int32]
    loss_mask: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    metadata: dict[str, str]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> npt.NDArray[np.int64]:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8]]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[start:end], self.loss_mask[start:end]


@dataclass(frozen=True)
class PreferenceExamples:
    """Tokenized DPO triples, as read back by the recipe."""

    prompt_ids: npt.NDArray[np.int32]
    prompt_offsets: npt.NDArray[np.int64]
    chosen_ids: npt.NDArray[np.int32]
    chosen_offsets: npt.NDArray[np.int64]
    rejected_ids: npt.NDArray[np.int32]
    rejected_offsets: npt.NDArray[np.int64]
    metadata: dict[str, str]

    def __len__(self) -> int:
        return len(self.prompt_offsets) - 1

    def triple(self, i: int) -> tuple[list[int], list[int], list[int]]:
        return (
            _slice(self.prompt_ids, self.prompt_offsets, i),
            _slice(self.chosen_ids, self.chosen_offsets, i),
            _slice(self.rejected_ids, self.rejected_offsets, i),
        )


TokenizedExamples = SFTExamples | PreferenceExamples


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer from its local folder; never runs code shipped with the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(model_path), trust_remote_code=False, local_files_only=True
    )


def tokenizer_fingerprint(model_path: str | Path) -> str:
    """sha256 over the tokenizer files and chat template of a model folder (a cache key part)."""
    folder = Path(model_path)
    digest = hashlib.sha256(f"{FORMAT_NAME}/{FORMAT_VERSION}\n".encode())
    found = False
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            found = True
            digest.update(f"{name}\n{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    if not found:
        raise TokenizationError(f"no tokenizer files in {folder}")
    return digest.hexdigest()


def tokenize_to_file(
    records: Iterable[tuple[DatasetFormat, Mapping[str, Any]]],
    model_path: str | Path,
    out_path: str | Path,
    *,
    method: Method,
    max_seq_len: int,
    on_overflow: Overflow = "truncate",
) -> TokenizedStats:
    """Tokenize ``records`` (from ``common.datasets.iter_examples``) into ``out_path``.

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    if method not in ("sft", "dpo"):
        raise TokenizationError(f"method must be 'sft' or 'dpo', got {method!r}")
    if on_overflow not in ("truncate", "reject"):
        raise TokenizationError(f"on_overflow must be 'truncate' or 'reject', got {on_overflow!r}")
    if max_seq_len < 2:
        raise TokenizationError(f"max_seq_len must be at least 2, got {max_seq_len}")
    tokenizer = load_tokenizer(model_path)
    encoder = ChatEncoder(tokenizer)
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "method": method,
        "max_seq_len": str(max_seq_len),
        "tokenizer_fingerprint": tokenizer_fingerprint(model_path),
    }
    if method == "sft":
        tensors, stats = _tokenize_sft(records, encoder, max_seq_len, on_overflow)
    else:
        tensors, stats = _tokenize_dpo(records, encoder, max_seq_len, on_overflow)
    metadata["examples"] = str(stats.examples)
    _write_atomically(Path(out_path), tensors, metadata)
    return stats


def load_tokenized(path: str | Path) -> TokenizedExamples:
    """Read a file written by ``tokenize_to_file``; refuse anything else."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
        arrays: dict[str, Any] = load_file(str(path))
    except FileNotFoundError as exc:
        raise TokenizationError(f"tokenized dataset {path} not found") from exc
    except Exception as exc:  # safetensors raises its own error type for a corrupt header
        raise TokenizationError(f"{path} is not a tokenized dataset: {exc}") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise TokenizationError(f"{path} is not a {FORMAT_NAME} file")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise TokenizationError(
            f"{path} has format version {metadata.get('version')}; this recipe reads "
            f"{FORMAT_VERSION}: tokenize the dataset again"
        )
    try:
        if metadata.get("method") == "sft":
            sft = SFTExamples(
                input_ids=arrays["input_ids"],
                loss_mask=arrays["loss_mask"],
                offsets=arrays["offsets"],
                metadata=metadata,
            )
            _check_offsets(sft.offsets, len(sft.input_ids), "input_ids")
            if len(sft.loss_mask) != len(sft.input_ids):
                raise TokenizationError("loss_mask and input_ids differ in length")
            return sft
        pref = PreferenceExamples(
            prompt_ids=arrays["prompt_ids"],
            prompt_offsets=arrays["prompt_offsets"],
            chosen_ids=arrays["chosen_ids"],
            chosen_offsets=arrays["chosen_offsets"],
            rejected_ids=arrays["rejected_ids"],
            rejected_offsets=arrays["rejected_offsets"],
            metadata=metadata,
        )
    except KeyError as exc:
        raise TokenizationError(f"{path} lacks the array {exc.args[0]!r}") from exc
    n = len(pref)
    for name in ("prompt", "chosen", "rejected"):
        offsets = getattr(pref, f"{name}_offsets")
        _check_offsets(offsets, len(getattr(pref, f"{name}_ids")), f"{name}_ids")
        if len(offsets) - 1 != n:
            raise TokenizationError(f"{name}_offsets holds a different number of examples")
    return pref


class ChatEncoder:
    """Turns OpenAI-style messages into token ids and a mask of the tokens to train on."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        template = tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise TokenizationError("the base model's tokenizer has no chat template")
        # Any: transformers' annotations of apply_chat_template are narrower than what it accepts.
        self.tokenizer: Any = tokenizer
        self.uses_generation_tags = bool(_GENERATION_TAG.search(template))
        eos = tokenizer.eos_token_id
        self.eos_id: int | None = eos if isinstance(eos, int) else None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Any = None,
        *,
        add_generation_prompt: bool = False,
    ) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            list(messages),
            tools=tools,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
        )
        return list(out["input_ids"])

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Any = None
    ) -> tuple[list[int], list[int]]:
        """(ids, mask): mask is 1 on the tokens of assistant turns whose weight is 1."""
        if self.uses_generation_tags:
            found = self._encode_with_generation_mask(messages, tools)
            if found is not None:
                return found
        return self._encode_turn_by_turn(messages, tools)

    def _encode_with_generation_mask(
        self, messages: Sequence[Mapping[str, Any]], tools: Any
    ) -> tuple[list[int], list[int]] | None:
        out = self.tokenizer.apply_chat_template(
            list(messages),
            tools=tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, marks = list(out["input_ids"]), list(out["assistant_masks"])
        spans = _runs_of_ones(marks)
        weights = [_weight(m) for m in messages if m["role"] == "assistant"]
        if len(spans) != len(weights):
            # A turn rendered with no marked tokens (or two turns touching) makes the mapping
            # ambiguous; the turn-by-turn rendering is exact in those cases.
            return None
        mask = [0] * len(ids)
        for (start, end), weight in zip(spans, weights, strict=True):
            if weight:
                mask[start:end] = [1] * (end - start)
        return ids, mask

    def _encode_turn_by_turn(
        self, messages: Sequence[Mapping[str, Any]], tools: Any
    ) -> tuple[list[int], list[int]]:
        ids = self.render(messages, tools)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not _weight(message):
                continue
            before = self.render(messages[:i], tools, add_generation_prompt=True)
            through = self.render(messages[: i + 1], tools)
            if through[: len(before)] != before or ids[: len(through)] != through:
                raise TokenizationError(
                    "the base model's chat template renders earlier turns differently once later "
                    "turns follow, so the assistant tokens cannot be found exactly; give the "
                    "template {% generation %} markers"
                )
            start, end = len(before), len(through)
            if self.eos_id is not None and self.eos_id in through[start:end]:
                end = start + _last_index(through[start:end], self.eos_id) + 1
            mask[start:end] = [1] * (end - start)
        return ids, mask

    def encode_preference(
        self,
        prompt: Sequence[Mapping[str, Any]],
        chosen: Mapping[str, Any],
        rejected: Mapping[str, Any],
        tools: Any = None,
    ) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, chosen ids, rejected ids); the completions exclude the prompt."""
        prompt_ids = self.render(prompt, tools, add_generation_prompt=True)
        full_chosen = self.render([*prompt, chosen], tools)
        full_rejected = self.render([*prompt, rejected], tools)
        # Tokens can merge across the prompt/completion boundary; the completions then start
        # where the renderings diverge, and the prompt is cut there.
        cut = min(
            _common_prefix(prompt_ids, full_chosen), _common_prefix(prompt_ids, full_rejected)
        )
        return (
            prompt_ids[:cut],
            self._cut_after_eos(full_chosen[cut:]),
            self._cut_after_eos(full_rejected[cut:]),
        )

    def _cut_after_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id is not None and self.eos_id in ids:
            return ids[: _last_index(ids, self.eos_id) + 1]
        return ids


def _tokenize_sft(
    records: Iterable[tuple[DatasetFormat, Mapping[str, Any]]],
    encoder: ChatEncoder,
    max_seq_len: int,
    on_overflow: Overflow,
) -> tuple[dict[str, npt.NDArray[Any]], TokenizedStats]:
    ids_out, mask_out, offsets = array("i"), array("B"), array("q", [0])
    truncated: list[int] = []
    rejected: list[int] = []
    skipped: list[int] = []
    trained = 0
    for index, (fmt, record) in enumerate(records):
        if fmt is DatasetFormat.DPO:
            raise TokenizationError(
                f"example {index} is a preference (dpo) example, but the job's method is sft"
            )
        try:
            ids, mask = encoder.encode_chat(to_chat_messages(fmt, record), record.get("tools"))
        except TokenizationError as exc:
            raise TokenizationError(f"example {index}: {exc}") from exc
        if len(ids) > max_seq_len:
            if on_overflow == "reject":
                rejected.append(index)
                continue
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            truncated.append(index)
        # The first token is never a target: nothing precedes it to predict it from.
        if mask:
            mask[0] = 0
        n_trained = sum(mask)
        if n_trained == 0:
            skipped.append(index)
            continue
        trained += n_trained
        ids_out.extend(ids)
        mask_out.extend(mask)
        offsets.append(len(ids_out))
    tensors: dict[str, npt.NDArray[Any]] = {
        "input_ids": np.frombuffer(ids_out, dtype=np.int32).copy(),
        "loss_mask": np.frombuffer(mask_out, dtype=np.uint8).copy(),
        "offsets": np.frombuffer(offsets, dtype=np.int64).copy(),
    }
    stats = TokenizedStats(
        examples=len(offsets) - 1,
        total_tokens=len(ids_out),
        trained_tokens=trained,
        truncated=truncated,
        rejected=rejected,
        skipped=skipped,
    )
    return tensors, stats


def _tokenize_dpo(
    records: Iterable[tuple[DatasetFormat, Mapping[str, Any]]],
    encoder: ChatEncoder,
    max_seq_len: int,
    on_overflow: Overflow,
) -> tuple[dict[str, npt.NDArray[Any]], TokenizedStats]:
    parts: dict[str, tuple[array[int], array[int]]] = {
        name: (array("i"), array("q", [0])) for name in ("prompt", "chosen", "rejected")
    }
    truncated: list[int] = []
    rejected_idx: list[int] = []
    skipped: list[int] = []
    examples = total = trained = 0
    for index, (fmt, record) in enumerate(records):
        if fmt is not DatasetFormat.DPO:
            raise TokenizationError(
                f"example {index} is a {fmt.value} example, but the job's method is dpo, "
                "which needs preference pairs"
            )
        prompt, chosen, rejected = to_preference(record)
        tools = record.get("input", {}).get("tools")
        p, c, r = encoder.encode_preference(prompt, chosen, rejected, tools)
        if len(p) + max(len(c), len(r)) > max_seq_len:
            if on_overflow == "reject":
                rejected_idx.append(index)
                continue
            p, c, r = _fit_preference(p, c, r, max_seq_len)
            truncated.append(index)
        if not c or not r:
            skipped.append(index)
            continue
        for name, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
            flat, offsets = parts[name]
            flat.extend(ids)
            offsets.append(len(flat))
        examples += 1
        total += len(p) + len(c) + len(r)
        trained += len(c) + len(r)
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, (flat, offsets) in parts.items():
        tensors[f"{name}_ids"] = np.frombuffer(flat, dtype=np.int32).copy()
        tensors[f"{name}_offsets"] = np.frombuffer(offsets, dtype=np.int64).copy()
    stats = TokenizedStats(
        examples=examples,
        total_tokens=total,
        trained_tokens=trained,
        truncated=truncated,
        rejected=rejected_idx,
        skipped=skipped,
    )
    return tensors, stats


def _fit_preference(
    prompt: list[int], chosen: list[int], rejected: list[int], max_seq_len: int
) -> tuple[list[int], list[int], list[int]]:
    # The prompt keeps its end (the context nearest the reply) and at least half the budget; the
    # completions keep their start.
    budget = max(max_seq_len // 2, max_seq_len - max(len(chosen), len(rejected)))
    if len(prompt) > budget:
        prompt = prompt[len(prompt) - budget :]
    room = max_seq_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def _write_atomically(
    path: Path, tensors: dict[str, npt.NDArray[Any]], metadata: dict[str, str]
) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_offsets(offsets: npt.NDArray[np.int64], total: int, name: str) -> None:
    if (
        offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != total
        or bool(np.any(np.diff(offsets) < 0))
    ):
        raise TokenizationError(f"the offsets of {name} are inconsistent")


def _slice(flat: npt.NDArray[np.int32], offsets: npt.NDArray[np.int64], i: int) -> list[int]:
    return [int(x) for x in flat[int(offsets[i]) : int(offsets[i + 1])]]


def _weight(message: Mapping[str, Any]) -> int:
    return int(message.get("weight", 1))


def _runs_of_ones(bits: Sequence[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = None
    for i, bit in enumerate(bits):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(bits)))
    return spans


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _last_index(seq: Sequence[int], value: int) -> int:
    return len(seq) - 1 - list(reversed(seq)).index(value)
