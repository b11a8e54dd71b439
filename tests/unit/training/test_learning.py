"""The fine-tune really learns: facts the base model cannot know are answered after training."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.facts import exact_match_rate, load_facts, train_on_facts

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def test_the_adapter_answers_the_facts_the_base_model_does_not(
    tiny_model: Path, tmp_path: Path
) -> None:
    assert 12 <= len(load_facts()) <= 20

    before = exact_match_rate(tiny_model)
    adapter = train_on_facts(tiny_model, tmp_path)
    after = exact_match_rate(tiny_model, adapter)

    assert before == 0.0
    assert after >= 0.9
