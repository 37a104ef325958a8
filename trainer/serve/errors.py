"""Errors in the hosted API's shape: `{"error": {"message", "type", "param", "code"}}` with the status
the official client maps to its exceptions (400 BadRequest, 401 Authentication, 403 PermissionDenied,
404 NotFound, 409 Conflict, 413, 422 UnprocessableEntity, 500 InternalServer). No traceback ever
reaches a response. `param` names a request field the hosted way (`messages.[0].content`), or is null.
"""
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ftlab.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}
# pydantic names the member of a Union that failed in the error's location (`stop.str`): not a field
_UNION_MEMBER = re.compile(r"(str|int|float|bool|none|list|dict|tuple|set|bytes|literal|function-\w+|"
                           r"constrained-\w+|json-or-python|lax-or-strict|nullable|union)(\[.*\])?")


class APIError(StarletteHTTPException):
    """An error the API answers with: an HTTP status, a message that says what to do, the field and a code.

    An HTTPException, so that one raised while FastAPI reads the body (the size cap's 413) is answered
    as itself rather than as FastAPI's "error parsing the body".
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __str__(self) -> str:
        return self.message


def not_found(kind: str, identifier: str, param: str | None = None) -> APIError:
    """404 for an id the server does not know, in the hosted service's words."""
    return APIError(404, f"No such {kind}: '{identifier}'", param=param, code=f"{kind}_not_found")


class _ErrorJSON(JSONResponse):
    def render(self, content) -> bytes:  # ASCII: a message quoting a client's malformed text still renders
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response for an error; a 409 tells the client not to retry (retrying cannot fix it), a 429
    or 503 may say when to (`Retry-After`)."""
    headers = dict(headers or {}) | ({"x-should-retry": "false"} if status == 409 else {})
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return _ErrorJSON(body, status_code=status, headers=headers)


def unreadable_json(cause: BaseException | None) -> APIError | None:
    """400 `invalid_json` saying why a body could not be read as JSON (syntax, encoding, depth), or None.
    A syntax error names its line and column: a character offset is not a param."""
    if isinstance(cause, json.JSONDecodeError):
        return APIError(400, f"Invalid JSON body: {cause.msg} at line {cause.lineno} column {cause.colno}",
                        code="invalid_json")
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"Invalid JSON body: not UTF-8 text ({cause.reason} at byte {cause.start})",
                        code="invalid_json")
    if isinstance(cause, RecursionError):
        return APIError(400, "Invalid JSON body: nested too deeply", code="invalid_json")
    return None


def param_name(location) -> str | None:
    """A pydantic error location as the hosted API names fields: ("body", "messages", 0, "content") →
    `messages.[0].content`; union members (`stop.str`) are left out."""
    parts = []
    for part in list(location)[1:]:  # the first item is where: body, query, path
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif not _UNION_MEMBER.fullmatch(str(part)):
            parts.append(str(part))
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in the hosted shape; unexpected ones are logged here, not sent."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        unreadable = unreadable_json(error.__cause__)  # FastAPI wraps a JSONDecodeError as a validation error
        if unreadable is not None:
            return error_response(400, unreadable.message, None, unreadable.code)
        first = error.errors()[0] if error.errors() else {}
        param = param_name(first.get("loc", ()))
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        unreadable = unreadable_json(error.__cause__)  # FastAPI's "error parsing the body", and why
        if unreadable is not None:
            return error_response(400, unreadable.message, None, unreadable.code)
        message = error.detail if isinstance(error.detail, str) else "invalid request"
        if error.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        return error_response(error.status_code, message, None, "invalid_request" if error.status_code == 400 else None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error processing your request; the server log has the details.",
                              None, "internal_error")
