"""/v1/files: upload, list, retrieve, delete, download."""

from __future__ import annotations

import hashlib
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import FinetunePrincipal, ServicesDep, SessionDep
from api.errors import ERROR_RESPONSES, BadRequest
from api.files import service
from api.files.repository import FileRepository
from api.files.schemas import FileDeleted, FileList, FileObject
from api.idempotency import fingerprint, run_idempotent
from api.json_body import StrictJSONRoute

router = APIRouter(
    prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES, route_class=StrictJSONRoute
)

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(service.PURPOSES)},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    response_model=FileObject,
    openapi_extra=_UPLOAD_SCHEMA,
    responses={400: {"description": "Invalid file or parameters"}},
)
async def create_file(
    request: Request,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Upload a dataset file (JSONL or JSON array); it is validated as it streams."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("Expected a multipart/form-data body with 'file' and 'purpose'.")
    # The body is spooled to a temporary file (never held in memory), then streamed on.
    form = await request.form(max_files=1, max_fields=8)
    for field in ("file", "purpose", *_EXPIRES_FIELDS):
        if len(form.getlist(field)) > 1:  # which copy would win is parser-dependent
            raise BadRequest(f"'{field}' was given more than once.", param=field)
    upload = form.get("file")
    purpose = form.get("purpose")
    if isinstance(upload, str):  # a part without a (plain, non-empty) filename
        raise BadRequest(
            "'file' was sent as a plain form field: send it as a file part with a filename "
            '(Content-Disposition: form-data; name="file"; filename="train.jsonl").',
            param="file",
        )
    if not isinstance(upload, UploadFile):
        raise BadRequest("Missing required parameter: 'file'.", param="file")
    if not isinstance(purpose, str):
        raise BadRequest("Missing required parameter: 'purpose'.", param="purpose")
    unknown = sorted(set(form.keys()) - {"file", "purpose", *_EXPIRES_FIELDS})
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    expires_after = _expires_after(form.get(_EXPIRES_FIELDS[0]), form.get(_EXPIRES_FIELDS[1]))

    def produce() -> tuple[int, dict[str, object]]:
        row = service.create_file(
            session,
            services.storage,
            services.settings,
            principal,
            source=upload.file,
            size=upload.size,
            filename=upload.filename,
            purpose=purpose,
            expires_after=expires_after,
        )
        return 200, FileObject.of(row).model_dump()

    try:
        # A key's replay must be for the same bytes: a retry with other data (same name and
        # size, even) would otherwise be answered with the first file, and trained on.
        content = (
            await run_in_threadpool(_sha256_of, upload.file) if idempotency_key is not None else ""
        )
        # Validation and the storage upload are blocking work: keep them off the event loop.
        return await run_in_threadpool(
            run_idempotent,
            session,
            principal.tenant_id,
            idempotency_key,
            fingerprint(
                "POST", "/v1/files", [upload.filename, upload.size, purpose, content, expires_after]
            ),
            produce,
        )
    finally:
        await form.close()


_EXPIRES_FIELDS = ("expires_after[anchor]", "expires_after[seconds]")
# OpenAI's bounds: one hour to 30 days after the upload.
EXPIRES_AFTER_RANGE = (3600, 2_592_000)


def _expires_after(anchor: object, seconds: object) -> int | None:
    """OpenAI's ``expires_after`` as the SDK sends it (two form fields); its seconds or None."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise BadRequest(
            "'expires_after[anchor]' must be 'created_at' (the only anchor there is).",
            param="expires_after[anchor]",
        )
    low, high = EXPIRES_AFTER_RANGE
    if not (isinstance(seconds, str) and seconds.isascii() and seconds.isdigit()) or not (
        low <= int(seconds) <= high
    ):
        raise BadRequest(
            f"'expires_after[seconds]' must be a whole number of seconds from {low} to {high}.",
            param="expires_after[seconds]",
        )
    return int(seconds)


def _sha256_of(source: BinaryIO) -> str:
    """The sha256 of a spooled upload, leaving it at its start."""
    digest = hashlib.sha256()
    source.seek(0)
    while chunk := source.read(1 << 20):
        digest.update(chunk)
    source.seek(0)
    return digest.hexdigest()


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    principal: FinetunePrincipal,
    # Any purpose the SDK may ask for: files of another purpose do not exist here (empty page).
    purpose: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """List your organization's files, newest first."""
    rows, has_more = FileRepository(session, principal.tenant_id).list(
        purpose=purpose, after=after, limit=limit, ascending=order == "asc"
    )
    data = [FileObject.of(r) for r in rows]
    return FileList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, principal: FinetunePrincipal) -> FileObject:
    """Retrieve one file's metadata."""
    return FileObject.of(service.get_file(session, principal, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(
    file_id: str, session: SessionDep, services: ServicesDep, principal: FinetunePrincipal
) -> FileDeleted:
    """Delete a file: its bytes are removed from storage."""
    row = service.delete_file(session, services.storage, principal, file_id)
    return FileDeleted(id=row.id, deleted=True)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(
    file_id: str, session: SessionDep, services: ServicesDep, principal: FinetunePrincipal
) -> StreamingResponse:
    """Download the file's bytes."""
    row = service.get_file(session, principal, file_id)
    return StreamingResponse(
        services.storage.open_stream(row.storage_key),
        media_type="application/octet-stream",
        headers={
            "content-length": str(row.bytes),
            "content-disposition": f'attachment; filename="{row.id}.jsonl"',
        },
    )
