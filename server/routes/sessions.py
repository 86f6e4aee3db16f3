"""Sessions: create, inspect (stats and the kept positions of the cache), delete."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Response
from starlette.concurrency import run_in_threadpool

from toyllm_core.serving.cache import kept_positions
from toyllm_core.serving.session import retention

from ..clients import ClientId
from ..deps import ProxySessionId, ReadyState, require_api_key
from ..errors import POSTED, READY, responses
from ..generation import cache_policy, token_text
from ..schemas import CreateSessionRequest, SessionCache, SessionCreated, SessionInfo, SessionRetention
from ..sessions import Session
from ..state import ServerState

router = APIRouter(prefix="/sessions", tags=["sessions"], dependencies=[Depends(require_api_key)])


async def _get(state: ServerState, session_id: str, client: str) -> Session:
    """The client's session (loaded from the session backend if need be: off the event loop)."""
    return await run_in_threadpool(state.store.get, session_id, client)


_CREATED = {"X-Session-ID": {"description": "The new session's id.", "schema": {"type": "string"}}}


@router.post("", response_model=SessionCreated, status_code=201,
             responses={201: {"headers": _CREATED}, **responses(429, *POSTED)})
async def create_session(state: ReadyState, client: ClientId, body: CreateSessionRequest | None = None,
                         proposed_id: ProxySessionId = None):
    """Create an empty session with its cache configuration (the server's default when left out)."""
    policy = cache_policy(state, body.cache if body else None)
    session = state.store.create(state.classes_of(policy)[0], proposed_id=proposed_id, owner=client)
    return Response(SessionCreated(session_id=session.id).model_dump_json(), 201,
                    media_type="application/json", headers={"X-Session-ID": session.id})


@router.get("/{session_id}", response_model=SessionInfo, responses=responses(404, 410, *READY))
async def get_session(session_id: str, state: ReadyState, client: ClientId):
    """A session's statistics."""
    s = await _get(state, session_id, client)
    return SessionInfo(session_id=s.id, created_at=s.created_at, last_used_at=s.last_used_at, busy=s.busy,
                       turns=s.turns, cache=s.stats(), cache_config=s.policy.describe(), memory=s.memory())


@router.get("/{session_id}/cache", response_model=SessionCache, responses=responses(404, 409, 410, *READY))
async def get_session_cache(session_id: str, state: ReadyState, client: ClientId):
    """The original positions the hot cache keeps, per layer and KV head, with their token texts, and
    those the cold tier holds (409 while a request uses the session: its tiers are in the engine then)."""
    await _get(state, session_id, client)
    with state.store.holding(session_id, client) as s:  # no request can take the cache while it is read
        heads = await run_in_threadpool(_kept_heads, state, s) if s.cache is not None else []
        tiers = s.tier_bytes(s.bytes_per_token)
        return SessionCache(session_id=s.id, policy=s.policy.name, tokens_seen=s.tokens_in_cache,
                            tokens_kept=s.length, tokens_cold=s.cold_tokens, hot_bytes=tiers["hot"],
                            cold_bytes=tiers["cold"], heads=heads)


def _kept_heads(state: ServerState, s: Session) -> list[dict]:
    kept = kept_positions(s.cache, s.length)  # [layers, kv_heads, length]: a device read, off the event loop
    texts: dict[int, str] = {}
    heads = []
    for layer in range(kept.shape[0]):
        for head in range(kept.shape[1]):
            slots = []
            for p in kept[layer, head].tolist():
                token = s.tokens[p]
                if token not in texts:
                    texts[token] = state.tokenizer.decode([token])
                slots.append({"position": p, "token_id": token, "text": texts[token]})
            cold = s.cold.pos[layer, head] if s.cold is not None else []
            heads.append({"layer": layer, "kv_head": head, "kept": slots, "cold": sorted(int(p) for p in cold if p >= 0)})
    return heads


@router.get("/{session_id}/retention", response_model=SessionRetention,
            responses=responses(404, 409, 410, *READY))
async def get_session_retention(session_id: str, state: ReadyState, client: ClientId,
                                texts_from: Annotated[int, Query(ge=0, description="Send token texts from this "
                                                                 "position on (a reader that has the earlier "
                                                                 "ones asks for the new ones only).")] = 0):
    """What the cache keeps of each token, in counts: per token, how many (layer, KV head) pairs hold it
    hot and cold, and a layers x positions map (binned past 256 columns); bounded in size (409 while
    a request uses the session, as the cache introspection)."""
    await _get(state, session_id, client)
    with state.store.holding(session_id, client) as s:
        return await run_in_threadpool(_retention, state, s, texts_from)


def _retention(state: ServerState, s: Session, texts_from: int) -> SessionRetention:
    kept = retention(s)
    counts = np.concatenate([kept["hot"], kept["cold"]])
    width = 1 if counts.size == 0 or counts.max() < 256 else 2
    pack = lambda a, dtype: base64.b64encode(np.ascontiguousarray(a, dtype).tobytes()).decode()
    dtype = np.uint8 if width == 1 else np.dtype("<u2")
    layers, columns = kept["map"].shape
    n = s.tokens_in_cache
    return SessionRetention(session_id=s.id, tokens=n, layers=layers,
                            kv_heads=s.cache.pos.shape[2] if s.cache is not None else 0, count_bytes=width,
                            hot=pack(kept["hot"], dtype), cold=pack(kept["cold"], dtype), map=pack(kept["map"], np.uint8),
                            map_columns=columns, texts_from=min(texts_from, n),
                            texts=[token_text(state, t) for t in s.tokens[texts_from:n]])


@router.delete("/{session_id}", status_code=204, responses=responses(404, 409, 410, *READY))
async def delete_session(session_id: str, state: ReadyState, client: ClientId):
    """Delete a session and free its cache."""
    await run_in_threadpool(state.store.delete, session_id, client)
    return Response(status_code=204)
