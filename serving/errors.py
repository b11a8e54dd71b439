"""Gateway errors, answered in OpenAI's error shape (the same one the API uses)."""

from __future__ import annotations

from starlette.responses import JSONResponse

from api.errors import error_body
from common.ids import show_id


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code),
            status_code=self.status,
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{show_id(model)}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unavailable(message: str, code: str) -> GatewayError:
    return GatewayError(503, message, type_="server_error", code=code)
