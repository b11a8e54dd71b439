"""Ids sort by creation; unsafe settings are refused outside embedded mode."""

from __future__ import annotations

import pytest

from common import ids
from common.settings import CommonSettings


def test_ids_are_strictly_increasing_and_unique() -> None:
    made = [ids.new_id(ids.JOB) for _ in range(5000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(len(i) == len("ftjob-") + 26 for i in made)


@pytest.mark.parametrize("bad", ["", "a b", "x\x00y", "é", "a" * 401, "a;drop"])
def test_implausible_ids_are_refused(bad: str) -> None:
    assert not ids.is_plausible_id(bad)


def test_dev_secret_refused_with_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_SECRET_KEY", raising=False)
    with pytest.raises(ValueError, match="SECRET_KEY"):
        CommonSettings(database_url="postgresql+psycopg://u@h/db")
    CommonSettings(database_url="postgresql+psycopg://u@h/db", secret_key="s" * 40)
    with pytest.raises(ValueError, match="at least 16 characters"):
        CommonSettings(database_url="postgresql+psycopg://u@h/db", secret_key="s" * 15)


def test_a_short_secret_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    CommonSettings(database_url="postgresql+psycopg://u@h/db", secret_key="s" * 24)
    assert "use 32 or more" in caplog.text
    caplog.clear()
    CommonSettings(database_url="postgresql+psycopg://u@h/db", secret_key="s" * 32)
    assert "use 32 or more" not in caplog.text


def test_embedded_defaults(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE_URL", "SECRET_KEY"):
        monkeypatch.delenv(f"LORAPLEX_{name}", raising=False)
    settings = CommonSettings(data_dir=tmp_path)
    assert settings.embedded
    assert settings.database_url == f"sqlite:///{tmp_path / 'loraplex.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert settings.storage_url == f"file://{tmp_path / 'objects'}"
