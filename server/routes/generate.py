"""POST /generate: stream tokens as server-sent events, or answer the whole generation as JSON."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from ..clients import ClientId
from ..deps import ProxySessionId, ReadyState, require_api_key
from ..engine import Failed, Finished, TokenOut
from ..errors import POSTED, bad_request, error_body, queue_full, responses
from ..generation import (
    EventStream,
    cache_policy,
    named_session,
    request_class,
    sampling_params,
    token_text,
    tokenize,
)
from ..schemas import GenerateDone, GenerateRequest

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])


def done_payload(session_id: str | None, done: Finished) -> dict:
    return GenerateDone(session_id=session_id, generated_text=done.generated_text, finish_reason=done.finish_reason,
                        usage=done.usage, cache=done.cache, timings=done.timings).model_dump()


async def wait_unless_disconnected(request: Request, stream: EventStream, tokens: list | None = None):
    """Await the final event of a non-streaming request (collecting its `TokenOut`s into `tokens`
    when given), cancelling it if the client goes away."""
    while True:
        try:
            event = await asyncio.wait_for(stream.next(), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                stream.cancel()
                return None
            continue
        if isinstance(event, Finished | Failed):
            return event
        if tokens is not None:
            tokens.append(event)


SESSION_HEADER = {"X-Session-ID": {"description": "The session this request ran in.", "schema": {"type": "string"}}}
# Each server-sent event: `token` per token, then `done` (or `error`); `data` is JSON.
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"enum": ["token", "done", "error"]},
                   "data": {"type": "string", "contentMediaType": "application/json"}}}}}


def token_payload(state, event: TokenOut) -> dict:
    data = {"index": event.index, "id": event.id, "text": event.text, "logprob": event.logprob}
    if event.top is not None:
        data["top_logprobs"] = [{"id": i, "text": token_text(state, i), "logprob": lp} for i, lp in event.top]
    return data


@router.post("/generate", response_model=GenerateDone,
             responses={200: {"content": _SSE, "headers": SESSION_HEADER},
                        **responses(400, 404, 409, 410, 429, 499, 500, *POSTED)})
async def generate(body: GenerateRequest, request: Request, state: ReadyState, client: ClientId,
                   x_session_id: Annotated[str | None, Header(max_length=64)] = None,
                   proposed_id: ProxySessionId = None):
    """Generate from a prompt, continuing `session_id` when given (a new session otherwise)."""
    store = state.store
    sampling = sampling_params(body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed, body.stop,
                               body.ignore_eos, top_logprobs=body.top_logprobs)
    # Behind a routing proxy clients name the session in the X-Session-ID header (see deploy/nginx).
    session_id = named_session(body.session_id, x_session_id)
    if session_id is not None:
        session = await run_in_threadpool(store.acquire, session_id, client)  # may load it: disk or network
        created = False
    else:
        policy = cache_policy(state, body.cache)
        if not state.engine_has_room():
            raise queue_full("the server is at capacity; retry later")
        session = store.create(state.classes_of(policy)[0], busy=True, proposed_id=proposed_id, owner=client)
        created = True
    try:
        if body.cache is not None and not created and cache_policy(state, body.cache) != session.policy:
            raise bad_request("a session's cache configuration is fixed when it is created; leave `cache` out "
                              "to continue this session")
        prompt_ids = await run_in_threadpool(tokenize, state, body.prompt)  # a long prompt takes a while
        cls = request_class(state, session, len(prompt_ids), body.max_new_tokens)
        stream = EventStream(state, session, cls, prompt_ids, sampling).submit()
    except BaseException:  # refused, failed or cancelled before the engine took it: the session is free
        if created:
            store.discard(session)
        else:
            store.release(session)
        raise
    headers = {"X-Session-ID": session.id}

    if not body.stream:
        event = await wait_unless_disconnected(request, stream)
        if event is None:
            return JSONResponse(error_body("cancelled", "client disconnected"), 499, headers=headers)
        if isinstance(event, Failed):
            return JSONResponse(error_body("generation_failed", event.message), event.status, headers=headers)
        return JSONResponse(done_payload(session.id, event), headers=headers)

    async def events():
        try:
            async for event in stream:
                if isinstance(event, TokenOut):
                    yield {"event": "token", "data": json.dumps(token_payload(state, event))}
                elif isinstance(event, Finished):
                    yield {"event": "done", "data": json.dumps(done_payload(session.id, event))}
                else:
                    yield {"event": "error", "data": json.dumps(error_body("generation_failed", event.message))}
        finally:
            stream.cancel()  # a no-op once finished; stops the generation if the client went away

    return EventSourceResponse(events(), headers=headers, ping=15)
