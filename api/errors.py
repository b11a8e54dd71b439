"""One error family, rendered in OpenAI's error shape by one handler.

``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}``
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class AppError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers


class BadRequest(AppError):
    pass


class Unauthorized(AppError):
    status_code = 401
    code = "invalid_api_key"


class PermissionDenied(AppError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_scope"


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "request_too_large"


class RateLimited(AppError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: AppError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


_LOCATIONS = {"body", "query", "path", "header", "form"}
# pydantic names the union member that failed ("int", "literal['auto']"); they are not fields.
_UNION_TAGS = {"int", "float", "str", "bool", "dict", "list", "none"}


def _field_path(loc: tuple[Any, ...]) -> str:
    # ("body", "method", "supervised", "hyperparameters", "n_epochs") -> "method.supervised..."
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        text = str(part)
        if text in _LOCATIONS or text in _UNION_TAGS or not text.isidentifier():
            continue
        path += f".{text}" if path else text
    return path or "body"


_TYPE_ERRORS = {"literal_error", "string_type", "int_type", "float_type", "bool_type"}


def _most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a union's errors, the one about the value's range beats "not the literal 'auto'"."""
    if not errors:
        return {}
    first_field = _field_path(tuple(errors[0].get("loc", ())))
    same_field = [e for e in errors if _field_path(tuple(e.get("loc", ()))) == first_field]
    for err in same_field:
        if err.get("type") not in _TYPE_ERRORS:
            return err
    # Only "wrong type" errors, one per member of a union: say what each member would take
    # ("Input should be 'auto' or a valid integer").
    wanted: list[str] = []
    for err in same_field:
        text = str(err.get("msg", "")).removeprefix("Input should be ")
        if text not in wanted:
            wanted.append(text)
    return {**same_field[0], "msg": "Input should be " + " or ".join(wanted)}


def _validation_message(err: dict[str, Any]) -> tuple[str, str]:
    field = _field_path(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return field, f"Unrecognized request argument supplied: {field}"
    if kind == "missing":
        return field, f"Missing required parameter: '{field}'."
    if kind == "json_invalid" or (kind == "model_attributes_type" and field == "body"):
        # (a JSON syntax error's location is the character offset, not a field)
        return "body", "We could not parse the JSON body of your request."
    return field, f"Invalid value for '{field}': {err.get('msg', 'invalid')}."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        field, message = _validation_message(_most_telling(errors))
        others = {_field_path(tuple(e.get("loc", ()))) for e in errors} - {field}
        if others:
            message += f" (Also invalid: {', '.join(sorted(others)[:5])}.)"
        return JSONResponse(
            error_body(message, "invalid_request_error", field, "invalid_request"),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        param = None
        if exc.status_code == 404:
            message = "Unknown request URL. Please check the URL and method."
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer to a body it could not decode at all (invalid UTF-8, a number
            # of thousands of digits, nesting deeper than the parser's stack).
            message = (
                "We could not parse the JSON body of your request (invalid UTF-8, a number "
                "too long, or nesting too deep)."
            )
            param, code = "body", "invalid_request"
        return JSONResponse(
            error_body(message, "invalid_request_error", param, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("The server had an error processing your request.", "server_error"),
            status_code=500,
        )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Documented on every router so the OpenAPI document lists what clients really receive.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request (the field or line at fault is named)"),
        (401, "Missing, unknown or revoked API key"),
        (403, "The API key lacks the scope"),
        (404, "No such object (or another organization's)"),
        (405, "Method not allowed"),
        (413, "Request body too large"),
        (429, "Rate limit or quota exceeded"),
    )
}
