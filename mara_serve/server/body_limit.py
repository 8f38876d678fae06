"""Request body size limit (413 in OpenAI's error shape), as a pure ASGI middleware.

A declared `Content-Length` over the limit is refused before the body is read; a chunked body
is counted as it arrives and refused as soon as it passes the limit (the route never sees it).
Pure ASGI (not `BaseHTTPMiddleware`) so streaming responses pass through untouched.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mara_serve.server.errors import BodyTooLargeError


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body too large (limit {self.max_bytes} bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = BodyTooLargeError(self._message()).payload().response()
            response.headers["Connection"] = "close"  # the unread body makes the socket unusable
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading; errors.py shapes it.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)
