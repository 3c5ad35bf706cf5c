"""The one place exceptions become OpenAI-shaped errors:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def headers(self) -> dict[str, str] | None:
        return None


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "authentication_error"


class Forbidden(APIError):
    status, type = 403, "permission_error"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class TooLarge(APIError):
    status, type = 413, "invalid_request_error"


class QueueFull(APIError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Unavailable(APIError):
    status, type = 503, "service_unavailable"


def error_body(status: int, type_: str, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(e.status, e.type, e.message, e.param, e.code),
        status_code=e.status,
        headers=e.headers(),
    )


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """Every bad field, one clause each: "messages: Field required; top_p: ..."."""
    parts, params = [], []
    if any(err.get("type") == "json_invalid" for err in e.errors()):
        return "the request body is not valid JSON", None
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        params.append(where)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts), (params[0] if len(params) == 1 else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return JSONResponse(
            error_body(400, "invalid_request_error", message, param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "error")
        return JSONResponse(error_body(e.status_code, kind, str(e.detail)), e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body(500, "server_error", f"internal error: {type(e).__name__}"), 500
        )
