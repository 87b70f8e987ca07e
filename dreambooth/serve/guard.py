"""Checks before any route runs: the bearer token (every route but /ping) and the request body's size."""

from __future__ import annotations

import base64
import hmac

from starlette.responses import JSONResponse

from dreambooth.serve.schemas import ApiError

OPEN_PATHS = ("/ping",)  # SageMaker's health check carries no credentials


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def token_matches(header: str, token: str) -> bool:
    """`Bearer TOKEN` for programs; `Basic` with TOKEN as the password for a browser's login prompt."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())


class Guard:
    """Pure ASGI middleware, so an oversized or unauthorized body is refused before anything reads it."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and scope["path"] not in OPEN_PATHS and not token_matches(headers.get("authorization", ""),
                                                                                 self.token):
            # The page asks the browser for a login (the token as password); programs are told to send a bearer.
            challenge = 'Basic realm="dreambooth serve", charset="UTF-8"' if scope["path"] == "/" else "Bearer"
            e = ApiError(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN'",
                         "Authorization", {"WWW-Authenticate": challenge}, kind="unauthorized")
            return await error_response(e)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(ApiError(400, "Content-Length is not a number", "Content-Length"))(
                    scope, receive, send)
            if int(length) > self.max_body:
                return await error_response(self._too_large())(scope, receive, send)
            return await self.app(scope, receive, send)
        # No length given (chunked): read up to the limit first, then hand the body on.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await error_response(self._too_large())(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()
        return await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the body is larger than the server's limit of {self.max_body} bytes (--max-body)",
                        "body", kind="too_large")
