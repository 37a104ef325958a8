"""What a request body may be: under the server's size caps, and, when JSON, made of text.

- `BodyLimit` (ASGI middleware) refuses a body over the cap with 413 in the hosted shape: at once
  when Content-Length says so, else as soon as the bytes received pass the cap (a chunked body).
  Uploads (`POST /v1/files`) have their own, larger cap (`server.max_upload_mb`). FastAPI's own
  `max_body_size` is not used: its 413 is plain text and replaces any response, a 401 included.
- `text_only_json` (a dependency of the /v1 routes) refuses JSON whose strings hold a lone UTF-16
  surrogate: `"\\ud800"` is valid JSON, and Python decodes it into a str that no tokenizer, file or
  response can encode, so it gets a 400 naming the field before any route sees it.
"""
from typing import Optional

from fastapi import Request

from trainer.serve.errors import APIError, error_response, unreadable_json


class BodyLimit:
    """ASGI middleware: a request body over the cap is refused with 413 before it is read whole."""

    def __init__(self, app, max_bytes: int, max_upload_bytes: int):
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/").endswith("/v1/files") and scope["method"] == "POST"
        cap = self.max_upload_bytes + (1 << 20) if upload else self.max_bytes  # multipart framing on top
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await error_response(413, f"Request body of {int(length):,} bytes is over this server's limit of "
                                        f"{cap:,} bytes", None, "request_too_large")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise APIError(413, f"Request body is over this server's limit of {cap:,} bytes",
                                   code="request_too_large")
            return message

        return await self.app(scope, counted, send)


async def text_only_json(request: Request) -> None:
    """Refuse (400) a JSON body with a lone surrogate in any string, key or value, naming where it is."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method not in ("POST", "PUT", "PATCH") or not (content_type == "application/json"
                                                                or content_type.endswith("+json")):
        return
    if not await request.body():
        return
    try:
        body = await request.json()  # parsed once: FastAPI has read it through the same cached call
    except (ValueError, RecursionError) as error:
        raise unreadable_json(error) or APIError(400, f"Invalid JSON body: {error}", code="invalid_json") from None
    where = lone_surrogate(body)
    if where is not None:
        field = where or "the request body"
        raise APIError(400, f"{field}: the text holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                       "its pair), which is not Unicode text. Send valid UTF-8 (escape a character beyond U+FFFF as "
                       "a pair, e.g. \\ud83d\\ude00).", param=where or None, code="invalid_unicode")


def lone_surrogate(value) -> Optional[str]:
    """Where in a decoded JSON value a string holds a lone surrogate (`messages.[0].content`; "" for the
    value itself), or None. Iterative, so any nesting depth json accepted is walked."""
    pending = [("", value)]  # a stack, children pushed last-first: the first bad string in the body is found
    while pending:
        path, item = pending.pop()
        if isinstance(item, str) and _has_surrogate(item):
            return path
        if isinstance(item, dict):
            if any(_has_surrogate(key) for key in item):
                return path
            pending.extend((f"{path}.{key}" if path else key, child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend((f"{path}.[{index}]" if path else f"[{index}]", item[index])
                           for index in reversed(range(len(item))))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
