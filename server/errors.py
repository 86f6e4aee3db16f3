"""API errors: every error answers JSON `{"error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    """Every error's body."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}

# What each error status means, and the headers it carries (the OpenAPI document declares them).
_ERRORS = {
    400: ("The request cannot be served: the prompt does not fit, or it contradicts its session.", {}),
    401: ("Missing or wrong API key (when the server has one).",
          {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    404: ("Unknown session (or another client's) or model.", {}),
    409: ("The session is busy with another request (here, or on another replica).", {}),
    410: ("The stored session's blob does not verify: the session is lost.", {}),
    413: ("The request body is over the server's max_body_bytes.", {}),
    422: ("A field is missing, out of bounds or not supported (the message names it).", {}),
    429: ("The queue is full, or the client holds its share of sessions and none is idle.", _RETRY_AFTER),
    499: ("The client went away before the answer (it never sees this).", {}),
    500: ("The generation failed (only this request is affected).", {}),
    503: ("The model is loading or warming up, or the server is shutting down.", _RETRY_AFTER),
}


def responses(*codes: int) -> dict:
    """OpenAPI `responses` for these error statuses (body: ErrorBody)."""
    return {code: {"model": ErrorBody, "description": _ERRORS[code][0], "headers": _ERRORS[code][1]}
            for code in codes}


# The errors every route behind the API key and readiness may answer; POST routes add 413 and 422.
READY = (401, 503)
POSTED = (401, 413, 422, 503)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def unsupported(message: str) -> ApiError:
    return ApiError(422, "unsupported_cache", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def busy(message: str) -> ApiError:
    return ApiError(409, "session_busy", message)


def queue_full(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(429, "queue_full", message, {"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": "5"})


def error_body(type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message}}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    from .clients import QuotaExceeded
    from .persistence import SessionLost
    from .sessions import SessionBusy, SessionNotFound

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.type, exc.message), exc.status, headers=exc.headers)

    # A session's lookup, mapped once for every route: absent, held by another request, or lost.
    @app.exception_handler(SessionNotFound)
    async def _no_session(_: Request, exc: SessionNotFound) -> JSONResponse:
        return JSONResponse(error_body("not_found", str(exc.args[0])), 404)

    @app.exception_handler(SessionBusy)
    async def _busy_session(_: Request, exc: SessionBusy) -> JSONResponse:
        return JSONResponse(error_body("session_busy", str(exc)), 409)

    @app.exception_handler(QuotaExceeded)
    async def _quota(_: Request, exc: QuotaExceeded) -> JSONResponse:
        return JSONResponse(error_body("quota_exceeded", str(exc)), 429, headers={"Retry-After": "1"})

    @app.exception_handler(SessionLost)
    async def _lost_session(_: Request, exc: SessionLost) -> JSONResponse:
        return JSONResponse(error_body("session_lost", str(exc)), 410)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("validation_error", _validation_message(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body that is not JSON text (bad UTF-8): a validation error like the rest.
            return JSONResponse(error_body("validation_error", "body: not valid JSON (UTF-8 text expected)"), 422)
        if exc.status_code == 405:  # every method the path has (Starlette names only the first route's)
            headers["Allow"] = ", ".join(_methods_of(request))
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), exc.status_code, headers=headers)


def routes_of(app) -> list:
    """Every route of the app, included routers flattened."""
    out = []
    for route in app.routes:
        inner = getattr(route, "original_router", None)  # FastAPI's wrapper of an included router
        out += routes_of(inner) if inner is not None else [route]
    return out


def _methods_of(request: Request) -> list[str]:
    methods = set()
    for route in routes_of(request.app):
        if getattr(route, "methods", None) and route.matches({**request.scope, "method": "GET"})[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)
