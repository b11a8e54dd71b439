"""Webhook endpoint and delivery objects, and the request bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from common.webhooks.events import EVENT_TYPES, JOB_EVENT_TYPES

EventType = Literal[
    "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"
]
assert set(EventType.__args__) == set(JOB_EVENT_TYPES.values())  # type: ignore[attr-defined]
assert set(EVENT_TYPES) >= set(JOB_EVENT_TYPES.values())


class _Strict(BaseModel):
    # strict: a JSON value of the wrong type is a 400, not coerced ("no" is not false, "5" is
    # not 5). A JSON integer still fits a float field.
    model_config = ConfigDict(extra="forbid", strict=True)


# Free text. No NUL: Postgres cannot store it in text. (Nor an unpaired surrogate, "\ud800":
# pydantic refuses one in any string with a constraint, so keep one on every str field.)
Description = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00]*$")]


class CreateEndpointRequest(_Strict):
    url: str = Field(max_length=2048, description="HTTPS URL that receives the events.")
    events: list[EventType] = Field(
        default_factory=lambda: list(JOB_EVENT_TYPES.values()),  # type: ignore[arg-type]
        min_length=1,
        description="Event types to deliver (default: all fine-tuning job events).",
    )
    description: Description = ""


class UpdateEndpointRequest(_Strict):
    url: str | None = Field(default=None, max_length=2048)
    events: list[EventType] | None = Field(default=None, min_length=1)
    description: Description | None = None
    enabled: bool | None = None


class RotateSecretRequest(_Strict):
    overlap_seconds: int = Field(
        default=24 * 3600,
        ge=0,
        le=7 * 24 * 3600,
        description="How long the previous secret keeps signing next to the new one.",
    )


class EndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None
    created_at: int
    # Only in the answers to create and rotate: shown once, never stored in clear.
    secret: str | None = None
    previous_secret_expires_at: int | None = None


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointObject]
    has_more: bool


class EndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


class AttemptObject(BaseModel):
    attempt: int
    created_at: int
    status_code: int | None
    duration_ms: float
    response_excerpt: str
    error: str | None


class DeliveryObject(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str
    event_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: int | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: int | None
    created_at: int
    attempt_log: list[AttemptObject] = Field(default_factory=list)


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryObject]
    has_more: bool
