"""schemathesis against /openapi.json: zero server errors and zero schema violations.

Driven programmatically (one hypothesis run per operation) rather than through the
schemathesis pytest plugin, so that failures of every operation are collected in one report.
"""

from __future__ import annotations

import contextlib
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.conftest import RunningApi

EXAMPLES_PER_OPERATION = 40


def test_openapi_fuzz(api_server: RunningApi, make_tenant) -> None:  # type: ignore[no-untyped-def]
    key = make_tenant().api_key
    schema = schemathesis.openapi.from_url(api_server.base_url + "/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def fuzz(case: Any, label: str = operation.label) -> None:
            try:
                case.call_and_validate(
                    base_url=api_server.base_url,
                    headers={"Authorization": f"Bearer {key}"},
                    # A schema cannot say "a valid JSONL dataset" or "an id that exists"; the
                    # checks that matter are server errors and schema conformance.
                    excluded_checks=[positive_data_acceptance],
                )
            except Exception as exc:
                failures.append(f"{label}: {exc}")
                raise

        # Failures are collected above and reported together below.
        with contextlib.suppress(Exception):
            fuzz()
    assert operations >= 12
    assert not failures, "\n\n".join(failures[:8])
