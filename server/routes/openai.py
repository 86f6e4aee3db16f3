"""The OpenAI-compatible subset: POST /v1/completions, POST /v1/chat/completions (streaming and not)
and GET /v1/models.

Completions are stateless: each runs in a throwaway session under the server's default cache
policy. A chat is stateless too unless it names a session (`session_id` in the body, or the
X-Session-ID header): then only the messages the session does not hold yet are rendered and
prefilled, against its compressed cache, and the reply is kept in it for the next turn.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from toyllm_core.chat import ChatTemplateError

from ..deps import ReadyState, State, require_api_key
from ..engine import Failed, Finished, TokenOut
from ..errors import ApiError, bad_request, busy, error_body, not_found
from ..generation import EventStream, request_class, sampling_params, tokenize
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..sessions import Session, SessionBusy, SessionNotFound
from ..state import ServerState
from .generate import wait_unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

# OpenAI has no "eos": the model stopping by itself is "stop".
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@router.get("/models")
async def list_models(state: State):
    """The served model."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                        "owned_by": "toyllm"}]}


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise not_found(f"model {model!r} is not served here; GET /v1/models lists {state.model_name!r}")


def _stops(body) -> list[str]:
    try:
        return body.stop_list
    except ValueError as e:
        raise bad_request(str(e)) from None


def _usage(event: Finished) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _ephemeral_session(state: ServerState) -> Session:
    return Session("openai-" + uuid.uuid4().hex, state.classes_of(state.default_policy)[0],
                   state.model.kv_bytes_per_token, busy=True)


async def _respond(request: Request, stream: EventStream, chunk: Callable[[str, str | None], dict],
                   whole: Callable[[Finished], dict], streaming: bool, headers: dict | None = None):
    """The answer in OpenAI's shape: `whole(final event)` as JSON, or `chunk(text, finish_reason)` per
    server-sent event, then `[DONE]`."""
    if not streaming:
        event = await wait_unless_disconnected(request, stream)
        if event is None:
            return JSONResponse(error_body("cancelled", "client disconnected"), 499, headers=headers)
        if isinstance(event, Failed):
            return JSONResponse(error_body("generation_failed", event.message), 500, headers=headers)
        return JSONResponse(whole(event), headers=headers)

    async def events():
        try:
            async for event in stream:
                if isinstance(event, TokenOut):
                    if event.text:
                        yield {"data": json.dumps(chunk(event.text, None))}
                elif isinstance(event, Finished):
                    yield {"data": json.dumps(chunk("", _FINISH[event.finish_reason]))}
                    yield {"data": "[DONE]"}
                else:
                    yield {"data": json.dumps(error_body("generation_failed", event.message))}
        finally:
            stream.cancel()

    return EventSourceResponse(events(), ping=15, headers=headers)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: ReadyState):
    """A text completion of one prompt."""
    _check_model(state, body.model)
    sampling = sampling_params(body.max_tokens, body.temperature, 0, body.top_p, body.seed, _stops(body))
    session = _ephemeral_session(state)
    prompt_ids = tokenize(state, body.prompt_text)
    cls = request_class(state, session, len(prompt_ids), body.max_tokens)
    stream = EventStream(state, session, cls, prompt_ids, sampling, ephemeral=True).submit()
    cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    def whole(event: Finished) -> dict:
        return {**chunk(event.generated_text, _FINISH[event.finish_reason]), "usage": _usage(event)}

    return await _respond(request, stream, chunk, whole, body.stream)


def _chat_prompt(state: ServerState, session: Session, messages: list[dict]) -> tuple[str, list[dict]]:
    """(text to prefill, the messages the session will hold once this turn is in).

    A new or stateless chat renders every message. A continued one renders only what the session
    does not hold: the client may resend the whole conversation (OpenAI style) or just the new turn.
    """
    chat = state.chat
    if not session.tokens:
        return chat.render(messages), messages
    if session.chat is None:
        raise bad_request(f"session {session.id!r} holds text that is not a chat (it was made by /generate); "
                          "start a chat in a new session")
    held = session.chat
    new = messages[len(held):] if messages[:len(held)] == held else messages
    if not new:
        raise bad_request("the session already holds every message sent; add the next user message")
    eot = state.end_of_turn
    closed = state.tokenizer.decode([session.pending]) if eot is not None and session.pending == eot else ""
    return chat.continuation(held, new, reply_closed=closed), held + new


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ReadyState,
                           x_session_id: Annotated[str | None, Header()] = None):
    """A chat reply, the prompt rendered with the model's chat template; stops at its end of turn."""
    _check_model(state, body.model)
    if state.chat is None:
        raise bad_request(f"{state.model_name} has no chat template; use /v1/completions, or start the server "
                          "with TOYLLM_CHAT_TEMPLATE=FILE")
    if body.session_id and x_session_id and body.session_id != x_session_id:
        raise bad_request("session_id in the body and the X-Session-ID header differ")
    session_id = body.session_id or x_session_id
    sampling = sampling_params(body.max_new_tokens, body.temperature, 0, body.top_p, body.seed, _stops(body),
                               eos_id=state.end_of_turn)
    if session_id is None:
        session = _ephemeral_session(state)
    else:
        try:
            session = state.store.acquire(session_id)
        except SessionNotFound as e:
            raise not_found(str(e.args[0])) from None
        except SessionBusy as e:
            raise busy(str(e)) from None
    try:
        text, messages = _chat_prompt(state, session, body.message_dicts)
        prompt_ids = tokenize(state, text, add_special_tokens=False)  # the template places any BOS itself
        cls = request_class(state, session, len(prompt_ids), body.max_new_tokens)
        stream = EventStream(state, session, cls, prompt_ids, sampling, ephemeral=session_id is None,
                             chat=None if session_id is None else messages).submit()
    except ChatTemplateError as e:
        if session_id is not None:
            state.store.release(session)
        raise bad_request(str(e)) from None
    except ApiError:
        if session_id is not None:
            state.store.release(session)
        raise
    cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    started = {"role": False}

    def chunk(text: str, finish: str | None) -> dict:
        delta = {"content": text} if text or finish is None else {}
        if not started["role"]:  # the first chunk names the speaker, as OpenAI's do
            started["role"] = True
            delta = {"role": "assistant", **delta}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def whole(event: Finished) -> dict:
        out = {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": event.generated_text},
                            "logprobs": None, "finish_reason": _FINISH[event.finish_reason]}],
               "usage": _usage(event)}
        if session_id is not None:
            out["session_id"] = session_id
        return out

    headers = {"X-Session-ID": session_id} if session_id is not None else None
    return await _respond(request, stream, chunk, whole, body.stream, headers)
