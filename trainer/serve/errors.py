"""Errors in the hosted API's shape: `{"error": {"message", "type", "param", "code"}}` with the status
the official client maps to its exceptions (400 BadRequest, 401 Authentication, 404 NotFound,
409 Conflict, 413, 422 UnprocessableEntity, 500 InternalServer). No traceback ever reaches a response.
"""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ftlab.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the API answers with: an HTTP status, a message that says what to do, the field and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def not_found(kind: str, identifier: str, param: str | None = None) -> APIError:
    """404 for an id the server does not know, in the hosted service's words."""
    return APIError(404, f"No such {kind}: '{identifier}'", param=param, code=f"{kind}_not_found")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """The JSON response for an error; a 409 tells the client not to retry (retrying cannot fix it)."""
    headers = {"x-should-retry": "false"} if status == 409 else None
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in the hosted shape; unexpected ones are logged here, not sent."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = error.detail if isinstance(error.detail, str) else "invalid request"
        if error.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        return error_response(error.status_code, message, None, None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error processing your request; the server log has the details.",
                              None, "internal_error")
