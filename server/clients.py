"""Who a request comes from: the client its sessions belong to.

A client is its API key (`TOYLLM_API_KEYS`, or the single `TOYLLM_API_KEY`; stored hashed, never as
the key), else the `X-Client-ID` header that a trusted proxy sets (deploy/nginx: the client's
address), else the address the request came from. A session belongs to the client that created
it: another client's requests see 404 for it, as if it did not exist. Each client has a share of
sessions and of cache bytes (`TOYLLM_CLIENT_MAX_SESSIONS`, `TOYLLM_CLIENT_MAX_CACHE_BYTES`): past
it, its own least recently used idle sessions are evicted, never another client's, and when none of
its own is idle it gets 429.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Request


class QuotaExceeded(RuntimeError):
    """A client at its share of sessions with none of its own idle to make room (429)."""


def client_id(request: Request) -> str:
    settings = request.app.state.toyllm.settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip() and settings.keys:
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    if settings.trusted_proxy and request.headers.get("x-client-id"):
        return "proxy:" + request.headers["x-client-id"][:128]
    return "addr:" + (request.client.host if request.client else "unknown")


ClientId = Annotated[str, Depends(client_id)]
