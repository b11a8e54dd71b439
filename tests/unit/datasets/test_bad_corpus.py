"""Every file of the bad-input corpus is refused with the expected code and line.

The corpus lives in tests/fixtures/bad_datasets/; expected.json maps each file to its
``code`` and ``line`` (null for whole-file problems) and, where a small file stands in for a
big one, the lowered ``limits`` to validate it under.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.datasets import (
    DatasetError,
    ValidationLimits,
    validate_bytes_iter,
    validate_path,
)

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "bad_datasets"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _refusal(name: str, chunk_size: int) -> DatasetError:
    spec = EXPECTED[name]
    limits = ValidationLimits(**spec.get("limits", {}))
    data = (CORPUS / name).read_bytes()
    with pytest.raises(DatasetError) as caught:
        validate_bytes_iter(_chunks(data, chunk_size), limits)
    return caught.value


def test_corpus_matches_its_manifest() -> None:
    files = {path.name for path in CORPUS.iterdir()} - {"expected.json", "__init__.py"}
    assert files == set(EXPECTED)
    assert len(files) >= 35


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_refused_with_code_and_line(name: str, chunk_size: int) -> None:
    spec = EXPECTED[name]
    error = _refusal(name, chunk_size)
    assert (error.code, error.line) == (spec["code"], spec["line"]), error.message
    if spec["line"] is not None:
        assert error.message.startswith(f"line {spec['line']}"), error.message
    # Hostile content (markup, megabyte keys, control bytes) must not leak into messages.
    assert len(error.message) < 400
    assert error.message.isprintable()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_validate_path_agrees_with_streaming(name: str) -> None:
    spec = EXPECTED[name]
    limits = ValidationLimits(**spec.get("limits", {}))
    with pytest.raises(DatasetError) as caught:
        validate_path(CORPUS / name, limits)
    assert (caught.value.code, caught.value.line) == (spec["code"], spec["line"])
