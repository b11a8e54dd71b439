"""The key format and the Authorization header rule shared by the API and the gateway."""

from __future__ import annotations

import pytest

from api.tenancy import keys


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([], "missing_api_key"),
        ([""], "missing_api_key"),
        (["Basic abc"], "invalid_api_key"),
        (["Bearer   "], "invalid_api_key"),
        (["Bearer lpx_a", "Bearer lpx_b"], "invalid_api_key"),
    ],
)
def test_bad_authorization_headers_name_the_problem(headers: list[str], code: str) -> None:
    with pytest.raises(keys.BadAuthorization) as caught:
        keys.bearer_token(headers)
    assert caught.value.code == code


def test_the_bearer_key_is_taken_whatever_the_scheme_case() -> None:
    key = keys.generate_key()
    assert keys.bearer_token([f"bearer {key} "]) == key
    assert keys.looks_like_key(key)


def test_an_unknown_key_is_never_echoed_in_full() -> None:
    key = keys.generate_key()
    message = keys.incorrect_key_message(key)
    assert key[:8] in message and key not in message
    assert keys.incorrect_key_message("short") == "Incorrect API key provided: …"
