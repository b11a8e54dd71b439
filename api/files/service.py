"""Uploading, listing and deleting dataset files.

An upload streams from the request's spooled body through the dataset validator and a
sha256 into object storage, in one pass and constant memory. If validation fails midway the
storage upload is aborted, so nothing partial is ever stored.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy.orm import Session

from api.errors import BadRequest, NotFound, RateLimited
from api.files.repository import FileRepository
from api.settings import APISettings
from api.tenancy.service import Principal
from common import ids
from common.datasets import DatasetError, DatasetSummary, StreamingValidator, ValidationLimits
from common.ids import show_id
from common.storage import ObjectStorage
from models_db.base import now_ts
from models_db.models import AuditLogEntry, File, Tenant

PURPOSES = ("fine-tune",)
_CHUNK = 1024 * 1024


def limits_from(settings: APISettings) -> ValidationLimits:
    return ValidationLimits(
        max_file_bytes=settings.max_file_bytes,
        max_line_bytes=settings.max_line_bytes,
        min_examples=settings.min_examples,
        max_examples=settings.max_examples,
    )


def clean_filename(raw: str | None) -> str:
    """Keep a display name only: no directories, no control characters, bounded length."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = re.sub(r"\s+", " ", name).strip()
    return name[:255] or "upload.jsonl"


def _validated_chunks(
    source: BinaryIO, validator: StreamingValidator, result: list[DatasetSummary]
) -> Iterator[bytes]:
    while chunk := source.read(_CHUNK):
        validator.feed(chunk)
        yield chunk
    # Raising here (before the iterator ends) makes the storage backend abort the upload.
    result.append(validator.finish())


def create_file(
    session: Session,
    storage: ObjectStorage,
    settings: APISettings,
    principal: Principal,
    *,
    source: BinaryIO,
    size: int | None,
    filename: str | None,
    purpose: str,
    expires_after: int | None = None,
) -> File:
    if purpose not in PURPOSES:
        raise BadRequest(
            f"Invalid purpose {purpose!r}: this service accepts files with purpose 'fine-tune'.",
            param="purpose",
        )
    if size is not None and size > settings.max_file_bytes:
        raise BadRequest(
            f"File is {size} bytes, over the limit of {settings.max_file_bytes} bytes.",
            param="file",
            code="file_too_large",
        )
    repo = FileRepository(session, principal.tenant_id)
    tenant = session.get(Tenant, principal.tenant_id)
    assert tenant is not None
    if size is not None and repo.stored_bytes() + size > tenant.max_stored_bytes:
        raise RateLimited(
            f"Storing this file would exceed your organization's storage quota of "
            f"{tenant.max_stored_bytes} bytes; delete files you no longer need.",
            code="storage_quota_exceeded",
            # DESIGN §3: a quota answers 429 with Retry-After. Waiting alone frees no storage,
            # so the openai SDK is also told not to retry on its own (x-should-retry).
            headers={"Retry-After": "60", "x-should-retry": "false"},
        )

    file_id = ids.new_id(ids.FILE)
    key = f"tenants/{principal.tenant_id}/files/{file_id}"
    validator = StreamingValidator(limits_from(settings))
    result: list[DatasetSummary] = []
    try:
        stored = storage.put_stream(key, _validated_chunks(source, validator, result))
    except DatasetError as err:
        raise BadRequest(
            f"Invalid file format for fine-tuning: {err.message}", param="file", code=err.code
        ) from err
    summary = result[0]
    created = now_ts()
    row = repo.add(
        File(
            id=file_id,
            tenant_id=principal.tenant_id,
            filename=clean_filename(filename),
            purpose=purpose,
            bytes=stored.size,
            sha256=stored.sha256,
            storage_key=key,
            format=summary.format.value,
            examples=summary.examples,
            created_at=created,
            expires_at=created + expires_after if expires_after is not None else None,
        )
    )
    session.add(
        AuditLogEntry(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="file.create",
            target_type="file",
            target_id=file_id,
            data={"bytes": stored.size, "format": summary.format.value},
        )
    )
    session.flush()
    return row


def get_file(session: Session, principal: Principal, file_id: str) -> File:
    row = FileRepository(session, principal.tenant_id).get_live(file_id)
    if row is None:
        raise NotFound(f"No such File object: {show_id(file_id)}", param="id")
    return row


def delete_file(
    session: Session, storage: ObjectStorage, principal: Principal, file_id: str
) -> File:
    row = get_file(session, principal, file_id)
    row.deleted_at = now_ts()
    session.add(
        AuditLogEntry(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="file.delete",
            target_type="file",
            target_id=file_id,
            data=None,
        )
    )
    session.flush()
    storage.delete(row.storage_key)
    return row
