"""The ASGI middleware every request passes: the body-size limit, request metrics and the count of
requests in flight (what a graceful shutdown waits for).

The body is read here, before any route sees it, and refused with 413 as soon as it passes
`max_body_bytes`: a Content-Length over the limit is refused unread, and a chunked upload is
refused at the chunk that crosses it, so no client can make the server buffer or parse more. (The
rest of such a body is read and dropped by uvicorn, which lets the client see the 413 rather than
a connection reset.)
"""

from __future__ import annotations

import json

from starlette.routing import Match

from .errors import error_body, routes_of
from .state import ServerState

_WITH_BODY = {"POST", "PUT", "PATCH"}


class RequestGuard:
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        state.in_flight += 1
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            limit = state.settings.max_body_bytes
            body = await _read_body(scope, receive, limit) if scope["method"] in _WITH_BODY else None
            if body is _TOO_LARGE:
                await _reply(send_status, 413, "payload_too_large", f"the request body is over {limit} bytes")
                return
            await self.app(scope, _replay(body, receive) if body is not None else receive, send_status)
        finally:
            state.in_flight -= 1
            route = scope.get("route") or _route_of(scope)
            endpoint = getattr(route, "path", None) or "unmatched"
            state.metrics.count_request(endpoint, status["code"])  # API traffic apart from probes


_TOO_LARGE = object()


async def _read_body(scope, receive, limit: int):
    """The whole request body (bytes), `_TOO_LARGE` past `limit`, or the disconnect message."""
    length = dict(scope.get("headers", [])).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return _TOO_LARGE
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


def _replay(first: dict, receive):
    """A `receive` that hands the route the body read already, then waits for the disconnect."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _route_of(scope):
    """The route a request would reach (for metrics of requests refused before routing)."""
    app = scope.get("app")
    for route in routes_of(app) if app is not None else ():
        if route.matches(scope)[0] == Match.FULL:
            return route
    return None


async def _reply(send, status: int, type_: str, message: str) -> None:
    body = json.dumps(error_body(type_, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
