"""Valid datasets pass in every format and layout, however the upload is cut into chunks."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.datasets import (
    DatasetError,
    DatasetFormat,
    DatasetSummary,
    StreamingValidator,
    ValidationLimits,
    iter_examples,
    validate_bytes_iter,
    validate_path,
)


def chat(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly. Ünïcödé, 日本語, emoji 😀."},
            {"role": "user", "content": f'What is {i} + {i}? Quote: "[{{]}}" \\ done'},
            {"role": "assistant", "content": f"{2 * i}", "weight": 1},
        ]
    }


def chat_with_tools(i: int) -> dict[str, Any]:
    call = {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": "add", "arguments": json.dumps({"a": i, "b": i})},
    }
    return {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": f"Add {i} and {i}.", "name": "ada"},
            {"role": "assistant", "content": "Let me add.", "weight": 0},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": str(2 * i)},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ],
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}],
        "parallel_tool_calls": False,
        "metadata": {"source": "unit-test"},
    }


def dpo(i: int) -> dict[str, Any]:
    return {
        "input": {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": f"Name the number {i}."},
            ]
        },
        "preferred_output": [{"role": "assistant", "content": f"{i} — of course."}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }


def alpaca(i: int) -> dict[str, Any]:
    return {
        "instruction": f"Double {i}.",
        "input": "" if i % 2 else "Show your work, «please».",
        "output": str(2 * i),
        "system": "You are a calculator.",
        "history": [["Hi", "Hello!"]] if i % 3 == 0 else [],
    }


def sharegpt(i: int) -> dict[str, Any]:
    turns = [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": f"Double {i}."},
        {"from": "function_call", "value": json.dumps({"name": "mul", "arguments": {}})},
        {"from": "observation", "value": str(2 * i)},
        {"from": "gpt", "value": f"{2 * i} 🎉"},
    ]
    return {"conversations": turns, "tools": "[]"}


def as_jsonl(records: list[dict[str, Any]], newline: str = "\n") -> bytes:
    lines = (json.dumps(r, ensure_ascii=False) for r in records)
    return "".join(line + newline for line in lines).encode()


def as_array(records: list[dict[str, Any]]) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=2).encode()


Builder = Callable[[int], dict[str, Any]]
GOOD_FILES: dict[str, tuple[Builder, Callable[[list[dict[str, Any]]], bytes], str]] = {
    "chat.jsonl": (chat, as_jsonl, "chat"),
    "chat_tools.jsonl": (chat_with_tools, as_jsonl, "chat"),
    "dpo.jsonl": (dpo, as_jsonl, "dpo"),
    "alpaca.jsonl": (alpaca, as_jsonl, "alpaca"),
    "alpaca.json": (alpaca, as_array, "alpaca"),
    "sharegpt.jsonl": (sharegpt, as_jsonl, "sharegpt"),
    "sharegpt.json": (sharegpt, as_array, "sharegpt"),
}


def good_file(name: str, n: int = 12) -> bytes:
    build, layout, _ = GOOD_FILES[name]
    return layout([build(i) for i in range(n)])


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def random_cuts(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), k=min(40, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_good_file_is_accepted_whatever_the_chunking(name: str) -> None:
    data = good_file(name)
    expected = DatasetSummary(DatasetFormat(GOOD_FILES[name][2]), 12, len(data))
    for size in (1, 7, 4096, len(data)):
        assert validate_bytes_iter(chunked(data, size)) == expected
    for seed in range(5):
        assert validate_bytes_iter(random_cuts(data, seed)) == expected


def test_multibyte_character_split_at_every_offset() -> None:
    data = as_jsonl([chat(i) for i in range(10)])
    emoji = data.index("😀".encode())
    for cut in range(emoji, emoji + 5):
        assert validate_bytes_iter([data[:cut], data[cut:]]).examples == 10


def test_bom_crlf_and_blank_lines_are_accepted() -> None:
    data = b"\xef\xbb\xbf\r\n" + as_jsonl([chat(i) for i in range(10)], "\r\n\r\n")
    for size in (1, 2, 3, 4096):
        summary = validate_bytes_iter(chunked(data, size))
        assert summary == DatasetSummary(DatasetFormat.CHAT, 10, len(data))


def test_last_line_without_newline_counts() -> None:
    data = as_jsonl([chat(i) for i in range(10)]).rstrip(b"\n")
    assert validate_bytes_iter([data]).examples == 10


def test_validate_path_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_bytes(good_file("sharegpt.json", n=30))
    summary = validate_path(path)
    assert (summary.format, summary.examples) == (DatasetFormat.SHAREGPT, 30)


def test_expected_format_is_enforced() -> None:
    data = good_file("chat.jsonl")
    summary = validate_bytes_iter([data], expected_format=DatasetFormat.CHAT)
    assert summary.format is DatasetFormat.CHAT
    with pytest.raises(DatasetError) as caught:
        validate_bytes_iter([data], expected_format=DatasetFormat.DPO)
    assert (caught.value.code, caught.value.line) == ("format_mismatch", 1)


def test_expected_format_names_the_missing_key() -> None:
    record = {"prompt": "2+2=", "completion": "4"}
    with pytest.raises(DatasetError) as caught:
        validate_bytes_iter([as_jsonl([record])], expected_format=DatasetFormat.CHAT)
    assert (caught.value.code, caught.value.line) == ("missing_messages", 1)


def test_error_has_message_code_and_line() -> None:
    records = [chat(i) for i in range(10)]
    records[6]["messages"][1]["role"] = "robot"
    with pytest.raises(DatasetError) as caught:
        validate_bytes_iter([as_jsonl(records)])
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.code, error.line) == ("unknown_role", 7)
    assert error.message == str(error)
    assert error.message.startswith("line 7: unknown role 'robot' in messages[1]")


def test_array_errors_name_the_element_and_its_first_line() -> None:
    records = [alpaca(i) for i in range(12)]
    records[3]["output"] = ""
    data = as_array(records)
    first_line = data[: data.index(b'"output": ""')].rfind(b"\n  {")
    line = data[:first_line].count(b"\n") + 2
    with pytest.raises(DatasetError) as caught:
        validate_bytes_iter(chunked(data, 5))
    assert (caught.value.code, caught.value.line) == ("invalid_alpaca_example", line)
    assert caught.value.message.startswith(f"line {line}, array element [3]: ")


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_hundred_thousand_brackets_do_not_crash(layout: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    data = b'{"messages": ' + deep + b"}\n" if layout == "jsonl" else b"[" + deep + b"]"
    for size in (7, 1 << 20):
        with pytest.raises(DatasetError) as caught:
            validate_bytes_iter(chunked(data, size))
        assert (caught.value.code, caught.value.line) == ("invalid_json", 1)


def test_overlong_line_is_refused_while_it_streams() -> None:
    validator = StreamingValidator(ValidationLimits(max_line_bytes=1000))
    validator.feed(b'{"messages": "' + b"x" * 900)
    with pytest.raises(DatasetError) as caught:
        validator.feed(b"x" * 200)  # no newline yet: the line is refused anyway
    assert (caught.value.code, caught.value.line) == ("line_too_long", 1)


def test_oversized_file_is_refused_while_it_streams() -> None:
    validator = StreamingValidator(ValidationLimits(max_file_bytes=3000))
    data = good_file("chat.jsonl", n=100)
    with pytest.raises(DatasetError) as caught:
        for chunk in chunked(data, 1000):
            validator.feed(chunk)
    assert caught.value.code == "file_too_large"


def test_an_error_sticks() -> None:
    validator = StreamingValidator()
    with pytest.raises(DatasetError) as first:
        validator.feed(b"not json\n")
    with pytest.raises(DatasetError) as again:
        validator.feed(as_jsonl([chat(1)]))
    assert again.value is first.value
    with pytest.raises(DatasetError):
        validator.finish()


def test_error_survives_pickling() -> None:
    error = DatasetError("line 3: unknown role 'robot'", "unknown_role", 3)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.code, copy.line) == (error.message, error.code, error.line)


def test_finish_twice_is_a_programming_error() -> None:
    validator = StreamingValidator()
    validator.feed(good_file("chat.jsonl"))
    validator.finish()
    with pytest.raises(RuntimeError):
        validator.finish()


def test_duplicate_keys_are_refused_even_in_nested_objects() -> None:
    line = b'{"messages": [{"role": "user", "role": "assistant", "content": "hi"}]}\n'
    with pytest.raises(DatasetError) as caught:
        validate_bytes_iter([line])
    assert (caught.value.code, caught.value.line) == ("duplicate_key", 1)


def test_iter_examples_yields_every_example_in_order() -> None:
    data = good_file("alpaca.json")
    examples = list(iter_examples(chunked(data, 13)))
    assert [fmt for fmt, _ in examples] == [DatasetFormat.ALPACA] * 12
    assert [record for _, record in examples] == [alpaca(i) for i in range(12)]


def test_iter_examples_yields_an_unterminated_last_line() -> None:
    data = good_file("dpo.jsonl").rstrip(b"\n")
    assert len(list(iter_examples([data]))) == 12


def test_iter_examples_checks_the_whole_file_at_the_end() -> None:
    examples = iter_examples([good_file("chat.jsonl", n=3)])
    assert len([next(examples) for _ in range(3)]) == 3
    with pytest.raises(DatasetError) as caught:
        next(examples)
    assert caught.value.code == "too_few_examples"


def test_example_limits_are_configurable() -> None:
    data = good_file("chat.jsonl", n=3)
    limits = ValidationLimits(min_examples=1)
    assert validate_bytes_iter([data], limits).examples == 3


def test_importing_the_validator_does_not_import_torch() -> None:
    code = (
        "import sys, common.datasets; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); "
        "sys.exit(sorted(heavy) or 0)"
    )
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def _outcome(chunks: list[bytes]) -> object:
    try:
        return validate_bytes_iter(chunks, ValidationLimits(min_examples=1))
    except DatasetError as error:
        assert error.message.isprintable() and len(error.message) < 400
        return (error.code, error.line, error.message)


def test_damaged_files_fail_cleanly_and_identically_however_chunked() -> None:
    rng = random.Random(20240601)
    for _ in range(300):
        data = bytearray(good_file(rng.choice(sorted(GOOD_FILES)), n=3))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            if rng.random() < 0.5:
                del data[pos : pos + rng.randint(1, 5)]
            else:
                data[pos:pos] = bytes([rng.choice(b'[]{}",:\\\n\r \x00\xff\xc3tn0-')])
        damaged = bytes(data)
        whole = _outcome([damaged])
        assert _outcome(chunked(damaged, 1)) == whole
        assert _outcome(random_cuts(damaged, seed=len(damaged))) == whole
