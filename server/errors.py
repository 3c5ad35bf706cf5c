"""The one place exceptions become errors: OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, except on Anthropic's routes
(``/v1/messages``), which answer in Anthropic's:
``{"type": "error", "error": {"type", "message"}}``."""

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


# Anthropic's names for our error types; the rest it shares.
_ANTHROPIC_TYPES = {
    "server_error": "api_error",
    "service_unavailable": "overloaded_error",
    "error": "api_error",
}


def anthropic_error_body(status: int, type_: str, message: str) -> dict:
    if status == 413:
        type_ = "request_too_large"
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(type_, type_), "message": message},
    }


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def _body(path: str, status: int, type_: str, message: str, param=None, code=None) -> dict:
    if is_anthropic(path):
        return anthropic_error_body(status, type_, message)
    return error_body(status, type_, message, param, code)


def error_response(e: APIError, path: str = "") -> JSONResponse:
    return JSONResponse(
        _body(path, e.status, e.type, e.message, e.param, e.code),
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


# The error type of an HTTP status the framework raised (a body it cannot parse, a wrong method).
_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _http_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _HTTP_TYPES.get(status, "invalid_request_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        body = _body(request.url.path, 400, "invalid_request_error", message, param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        body = _body(request.url.path, e.status_code, _http_type(e.status_code), str(e.detail))
        return JSONResponse(body, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        message = f"internal error: {type(e).__name__}"
        return JSONResponse(_body(request.url.path, 500, "server_error", message), 500)
