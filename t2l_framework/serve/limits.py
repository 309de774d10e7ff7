"""Input budgets of the HTTP server: the request body size, checked before anything parses it.

A body over the limit is answered 413 as soon as its ``Content-Length`` (or, for a chunked body,
the bytes received so far) passes the limit, so a 300 MB upload costs the server at most the
limit in memory and never reaches JSON parsing or validation.
"""

from __future__ import annotations

import json

DEFAULT_MAX_BODY_BYTES = 1 << 20  # a chat request is a few kB; 1 MiB leaves room for long histories


def _too_large(limit: int) -> list[dict]:
    body = json.dumps({"error": {"message": f"request body larger than {limit} bytes", "type": "invalid_request_error",
                                 "param": None, "code": 413}}).encode()
    return [{"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]},
            {"type": "http.response.body", "body": body}]


class BodyLimit:
    """ASGI middleware: read the whole body (at most ``max_bytes``), then hand it on; 413 beyond."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app, self.max_bytes = app, int(max_bytes)

    async def _refuse(self, send) -> None:
        for message in _too_large(self.max_bytes):
            await send(message)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as streaming responses expect

        await self.app(scope, replay, send)
