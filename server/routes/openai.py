"""The OpenAI-compatible subset: POST /v1/completions, POST /v1/chat/completions (streaming and not)
and GET /v1/models.

Completions are stateless: each runs in a throwaway session under the server's default cache
policy. A chat is stateless too unless it names a session (`session_id` in the body, or the
X-Session-ID header): then only the messages the session does not hold yet are rendered and
prefilled, against its compressed cache, and the reply is kept in it for the next turn.

Implemented beyond text: `logprobs` (the chosen tokens' log-probabilities and the likeliest
alternatives), `echo`, `stream_options.include_usage`, `seed` (64 bits) and `top_k` (an extension,
as vLLM has). Fields for features this server lacks are refused with 422 (see schemas.py).
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from toyllm_core.chat import ChatTemplateError
from toyllm_core.serving.session import NotAChat

from ..clients import ClientId
from ..deps import ReadyState, State, require_api_key
from ..engine import Failed, Finished, TokenOut
from ..errors import POSTED, bad_request, error_body, not_found, responses
from ..generation import (
    EventStream,
    cache_policy,
    check_prompt,
    named_session,
    request_class,
    sampling_params,
    token_raw_bytes,
    token_text,
    tokenize,
)
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..sessions import Session
from ..state import ServerState
from .generate import SESSION_HEADER, wait_unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

# Each server-sent event's data: a JSON chunk per piece of text, then `[DONE]`.
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json"}]}}}}}
_ANSWERS = responses(400, 404, 429, 499, 500, *POSTED)

# OpenAI has no "eos": the model stopping by itself is "stop".
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@router.get("/models", responses=responses(401))
async def list_models(state: State):
    """The served model."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                        "owned_by": "toyllm"}]}


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise not_found(f"model {model!r} is not served here; GET /v1/models lists {state.model_name!r}")


def _ephemeral_session(state: ServerState, policy=None) -> Session:
    """A throwaway session for a stateless request, under `policy` (the server's default cache)."""
    return Session(state.classes_of(policy or state.default_policy)[0], id="openai-" + uuid.uuid4().hex,
                   bytes_per_token=state.model.kv_bytes_per_token, busy=True)


async def _respond(request: Request, stream: EventStream,
                   chunk: Callable[[TokenOut | None, str | None, str], dict | None],
                   whole: Callable[[Finished, list[TokenOut]], dict], streaming: bool, include_usage: bool,
                   headers: dict | None = None):
    """The answer in OpenAI's shape: `whole(final event)` as JSON, or server-sent events: `chunk(token,
    None, "")` per token (None: nothing to send yet), `chunk(None, finish_reason, tail)` at the end (the
    text the end-of-text token released, which has no token of its own), the usage chunk when asked,
    then `[DONE]`."""
    if not streaming:
        tokens: list[TokenOut] = []
        event = await wait_unless_disconnected(request, stream, tokens)
        if event is None:
            return JSONResponse(error_body("cancelled", "client disconnected"), 499, headers=headers)
        if isinstance(event, Failed):
            return JSONResponse(error_body("generation_failed", event.message), event.status, headers=headers)
        return JSONResponse(whole(event, tokens), headers=headers)

    def sent(data: dict) -> dict:
        if include_usage:  # OpenAI's chunks then all carry `usage`, null but in the last one
            data.setdefault("usage", None)
        return {"data": json.dumps(data)}

    async def events():
        try:
            async for event in stream:
                if isinstance(event, TokenOut):
                    data = chunk(event, None, "")
                    if data is not None:
                        yield sent(data)
                elif isinstance(event, Finished):
                    yield sent(chunk(None, _FINISH[event.finish_reason], event.tail))
                    if include_usage:
                        yield sent({**chunk(None, None, ""), "choices": [], "usage": event.usage})
                    yield {"data": "[DONE]"}
                else:
                    yield {"data": json.dumps(error_body("generation_failed", event.message))}
        finally:
            stream.cancel()

    return EventSourceResponse(events(), ping=15, headers=headers)


class _CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token. With echo, the prompt's tokens
    come first, their log-probabilities null (prefill does not compute them; OpenAI's first is null too)."""

    def __init__(self, state: ServerState, prompt_ids: list[int]):
        self.state, self.offset, self.prompt_ids = state, 0, prompt_ids

    def of(self, events: list[TokenOut]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a character split across tokens counts once
        for token in self.prompt_ids:
            out["tokens"].append(token_text(self.state, token))
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(self.offset)
            self.offset += len(utf8.decode(token_raw_bytes(self.state, token)))
        self.prompt_ids = []
        for e in events:
            out["tokens"].append(token_text(self.state, e.id))
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({token_text(self.state, i): lp for i, lp in e.top or []})
            out["text_offset"].append(self.offset)
            self.offset += len(e.text)
        return out


def _chat_logprob(state: ServerState, token: int, logprob: float) -> dict:
    return {"token": token_text(state, token), "logprob": logprob, "bytes": list(token_raw_bytes(state, token))}


def _chat_logprobs(state: ServerState, events: list[TokenOut]) -> dict:
    return {"content": [{**_chat_logprob(state, e.id, e.logprob),
                         "top_logprobs": [_chat_logprob(state, i, lp) for i, lp in e.top or []]} for e in events]}


@router.post("/completions", responses={200: {"content": _SSE}, **_ANSWERS})
async def completions(body: CompletionRequest, request: Request, state: ReadyState):
    """A text completion of one prompt."""
    _check_model(state, body.model)
    sampling = sampling_params(body.max_tokens, body.temperature, body.top_k_value, body.top_p, body.seed,
                               body.stop_list, ignore_eos=body.ignore_eos, top_logprobs=body.logprobs or 0)
    session = _ephemeral_session(state, cache_policy(state, body.cache))
    prompt = body.prompt_text
    prompt_ids = await run_in_threadpool(tokenize, state, prompt)  # a long prompt takes a while
    cls = request_class(state, session, len(prompt_ids), body.max_tokens)
    stream = EventStream(state, session, cls, prompt_ids, sampling, ephemeral=True).submit()
    cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    echo = prompt if body.echo else ""
    logprobs = _CompletionLogprobs(state, prompt_ids if body.echo else []) if body.logprobs is not None else None
    first = {"chunk": True}

    def choice(text: str, logprobs_of: dict | None, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs_of, "finish_reason": finish}]}

    def chunk(token: TokenOut | None, finish: str | None, tail: str) -> dict | None:
        text = token.text if token is not None else tail
        if first["chunk"] and (token is not None or finish is not None):
            first["chunk"], text = False, echo + text  # echo: the first chunk starts with the prompt
        if token is not None and not text and logprobs is None:
            return None  # nothing to say yet (a character split across tokens)
        # The end chunk has no token, but it is the first one when the end of text came first: echo's tokens.
        lp = logprobs is not None and (token is not None or (finish is not None and logprobs.prompt_ids))
        return choice(text, logprobs.of([token] if token is not None else []) if lp else None, finish)

    def whole(event: Finished, tokens: list[TokenOut]) -> dict:
        return {**choice(echo + event.generated_text, logprobs.of(tokens) if logprobs is not None else None,
                         _FINISH[event.finish_reason]), "usage": event.usage}

    return await _respond(request, stream, chunk, whole, body.stream, body.include_usage)


def _chat_prompt(state: ServerState, session: Session, messages: list[dict]) -> tuple[list[int], list[dict]]:
    """(token ids to prefill, the messages the session will hold once this turn is in): the core
    session's continuation of its chat (`Session.chat_prompt`), checked against the prompt limits."""
    try:
        ids, held = session.chat_prompt(state.chat, state.tokenizer, messages, state.end_of_turn)
    except NotAChat as e:
        raise bad_request(f"session {session.id!r}: {e}") from None
    return check_prompt(state, ids), held


@router.post("/chat/completions", responses={200: {"content": _SSE, "headers": SESSION_HEADER},
                                            **responses(409, 410), **_ANSWERS})
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ReadyState,
                           client: ClientId, x_session_id: Annotated[str | None, Header(max_length=64)] = None):
    """A chat reply, the prompt rendered with the model's chat template; stops at its end of turn."""
    _check_model(state, body.model)
    if state.chat is None:
        raise bad_request(f"{state.model_name} has no chat template; use /v1/completions, or start the server "
                          "with TOYLLM_CHAT_TEMPLATE=FILE")
    session_id = named_session(body.session_id, x_session_id)
    top = body.top_logprobs or 0
    sampling = sampling_params(body.max_new_tokens, body.temperature, body.top_k_value, body.top_p, body.seed,
                               body.stop_list, ignore_eos=body.ignore_eos, eos_id=state.end_of_turn,
                               top_logprobs=top)
    policy = cache_policy(state, body.cache)
    if session_id is None:
        session = _ephemeral_session(state, policy)
    else:
        session = await run_in_threadpool(state.store.acquire, session_id, client)  # may load it
    try:
        if body.cache is not None and session_id is not None and policy != session.policy:
            raise bad_request("a session's cache configuration is fixed when it is created; leave `cache` out "
                              "to continue this session")
        # Rendering and tokenizing a long conversation takes a while: off the event loop.
        prompt_ids, messages = await run_in_threadpool(_chat_prompt, state, session, body.message_dicts)
        cls = request_class(state, session, len(prompt_ids), body.max_new_tokens)
        stream = EventStream(state, session, cls, prompt_ids, sampling, ephemeral=session_id is None,
                             chat=None if session_id is None else messages).submit()
    except BaseException as e:  # refused, failed or cancelled before the engine took it: the session is free
        if session_id is not None:
            state.store.release(session)
        if isinstance(e, ChatTemplateError):
            raise bad_request(str(e)) from None
        raise
    cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    started = {"role": False}

    def chunk(token: TokenOut | None, finish: str | None, tail: str) -> dict | None:
        text = token.text if token is not None else tail
        if token is not None and not text and not body.wants_logprobs:
            return None  # nothing to say yet (a character split across tokens)
        delta = {"content": text} if text or finish is None else {}
        if not started["role"]:  # the first chunk names the speaker, as OpenAI's do
            started["role"] = True
            delta = {"role": "assistant", **delta}
        logprobs = _chat_logprobs(state, [token]) if body.wants_logprobs and token is not None else None
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def whole(event: Finished, tokens: list[TokenOut]) -> dict:
        out = {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": event.generated_text},
                            "logprobs": _chat_logprobs(state, tokens) if body.wants_logprobs else None,
                            "finish_reason": _FINISH[event.finish_reason]}],
               "usage": event.usage}
        if session_id is not None:
            out["session_id"] = session_id
        return out

    headers = {"X-Session-ID": session_id} if session_id is not None else None
    return await _respond(request, stream, chunk, whole, body.stream, body.include_usage, headers)
