"""Route dependencies: the shared state, readiness, the API key, and the proxy's session id."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import ApiError, unavailable
from .state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.toyllm


State = Annotated[ServerState, Depends(get_state)]


def proxy_session_id(state: State,
                     x_new_session_id: Annotated[str | None, Header(include_in_schema=False)] = None) -> str | None:
    """The id a routing proxy minted for a session it is about to create (see deploy/nginx), honoured
    only when the settings say a trusted proxy is in front; otherwise any client could name sessions."""
    return x_new_session_id if state.settings.trusted_proxy else None


ProxySessionId = Annotated[str | None, Depends(proxy_session_id)]


def require_api_key(request: Request, state: State) -> None:
    keys = state.settings.keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Compared with every key (no early exit: the time does not say which one nearly matched).
    matches = [secrets.compare_digest(token.strip().encode(), k.encode()) for k in sorted(keys)]
    if scheme.lower() != "bearer" or not any(matches):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                       {"WWW-Authenticate": "Bearer"})


def ready_state(state: State) -> ServerState:
    if state.shutting_down:
        raise unavailable("the server is shutting down")
    if not state.ready:
        raise unavailable("the model is still loading or warming up; retry when /ready answers 200")
    return state


ReadyState = Annotated[ServerState, Depends(ready_state)]
