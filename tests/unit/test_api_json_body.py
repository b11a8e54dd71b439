"""JSON request bodies (common.strict_json, api.json_body): a key repeated in one object is
refused, named with where it is."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.routing import APIRoute

from api.json_body import StrictJSONRoute, duplicate_key_error
from common.strict_json import DuplicateKey, loads


def _refused(body: str | bytes) -> tuple[str, str]:
    with pytest.raises(DuplicateKey) as caught:
        loads(body if isinstance(body, bytes) else body.encode())
    return caught.value.key, caught.value.where


@pytest.mark.parametrize(
    "body",
    ['{"a": 1, "b": {"c": [1, {"d": null}]}}', "[]", "3", '"x"', '{"a": {}, "b": {}}'],
)
def test_bodies_without_repeats_parse_as_json_loads_parses_them(body: str) -> None:
    assert loads(body.encode()) == json.loads(body)
    assert loads(body.encode("utf-16")) == json.loads(body)
    assert loads(b"\xef\xbb\xbf" + body.encode()) == json.loads(b"\xef\xbb\xbf" + body.encode())


@pytest.mark.parametrize(
    ("body", "key", "where"),
    [
        ('{"model": "a", "model": "b"}', "model", ""),
        ('{"hyperparameters": {"n_epochs": 1, "n_epochs": 2}}', "n_epochs", "hyperparameters"),
        ('{"metadata": {"x": "1", "y": "2", "x": "1"}}', "x", "metadata"),
        ('{"a": [{"b": 1}, {"b": 1, "b": 2}]}', "b", "a[1]"),
        ('[{"k": 1, "k": 1}]', "k", "[0]"),
        # The first object a parser finishes with a repeat: the inner one here.
        ('{"a": 1, "m": {"x": 1, "x": 2}, "a": 2}', "x", "m"),
    ],
)
def test_a_repeated_key_is_named_with_its_object(body: str, key: str, where: str) -> None:
    assert _refused(body) == (key, where)


def test_what_follows_a_repeat_still_fails_as_json_would() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads(b'{"a": 1, "a": 2} trailing')
    with pytest.raises(json.JSONDecodeError):
        loads(b'{"a": {"b": 1, "b": 2}, "c": }')


def test_the_error_names_the_key_and_its_path() -> None:
    error = duplicate_key_error(DuplicateKey("n_epochs", "method.supervised.hyperparameters"))
    assert (error.status_code, error.param, error.code) == (
        400,
        "method.supervised.hyperparameters.n_epochs",
        "duplicate_key",
    )
    assert "'n_epochs'" in error.message and "at method.supervised.hyperparameters" in error.message
    top = duplicate_key_error(DuplicateKey("model", ""))
    assert top.param == "model" and " at " not in top.message
    long = duplicate_key_error(DuplicateKey("k" * 10_000, "metadata"))
    assert len(long.message) < 300 and len(long.param or "") < 100


def _routes(routes: list[Any]) -> list[APIRoute]:
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        # Included routers (FastAPI keeps them as branches of the app's router).
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        found += _routes(list(inner or []))
    return found


def test_every_route_of_the_public_api_refuses_repeated_keys() -> None:
    from api.app import create_app

    routes = [r for r in _routes(create_app().routes) if r.path.startswith("/v1/")]
    assert len(routes) >= 20
    assert [r.path for r in routes if not isinstance(r, StrictJSONRoute)] == []
    assert [r.path for r in routes if r.body_field is not None]  # (the check saw JSON routes)


def test_finding_a_repeat_stays_linear_and_short_in_a_deep_wide_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body built to make the search slow (deep nesting of long keys, then many siblings):
    the path is put together once, for the object found (building it for every key visited
    copied the whole path 120,000 times here, over a second of CPU), and named in a bounded
    string."""
    from common import strict_json

    shown: list[str] = []
    real_show_id = strict_json.show_id
    monkeypatch.setattr(strict_json, "show_id", lambda v: shown.append(v) or real_show_id(v))
    depth, key = 850, "k" * 80
    body = (
        "".join(f'{{"{key}{i}": ' for i in range(depth))
        + "{"
        + ", ".join(f'"s{i}": 0' for i in range(120_000))
        + ', "s0": 1}'
        + "}" * depth
    ).encode()
    with pytest.raises(DuplicateKey) as caught:
        loads(body)
    assert caught.value.key == "s0"
    assert len(shown) <= depth + 1
    message, param = caught.value.describe()
    assert len(caught.value.where) <= 201 and len(param) < 300 and len(message) < 600


def test_a_key_that_looks_like_an_index_is_still_a_key() -> None:
    assert _refused('{"[0]": {"a": 1, "a": 2}}') == ("a", "[0]")
    assert _refused('{"x": [{"a": 1, "a": 2}]}') == ("a", "x[0]")
