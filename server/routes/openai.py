"""The OpenAI-compatible subset: POST /v1/completions (streaming and not) and GET /v1/models.

Completions are stateless: each runs in a throwaway session under the server's default cache policy.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from ..deps import ReadyState, State, require_api_key
from ..engine import Failed, Finished, TokenOut
from ..errors import bad_request, error_body, not_found
from ..generation import EventStream, request_class, sampling_params, tokenize
from ..schemas import CompletionRequest
from ..sessions import Session
from .generate import wait_unless_disconnected

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

# OpenAI has no "eos": the model stopping by itself is "stop".
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@router.get("/models")
async def list_models(state: State):
    """The served model."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                        "owned_by": "toyllm"}]}


def _chunk(completion_id: str, created: int, model: str, text: str, finish_reason: str | None) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: ReadyState):
    """A text completion of one prompt."""
    if body.model != state.model_name:
        raise not_found(f"model {body.model!r} is not served here; GET /v1/models lists {state.model_name!r}")
    try:
        stops = body.stop_list
    except ValueError as e:
        raise bad_request(str(e)) from None
    sampling = sampling_params(body.max_tokens, body.temperature, 0, body.top_p, body.seed, stops)
    session = Session("openai-" + uuid.uuid4().hex, state.classes_of(state.default_policy)[0],
                      state.model.kv_bytes_per_token, busy=True)
    prompt_ids = tokenize(state, body.prompt_text)
    cls = request_class(state, session, len(prompt_ids), body.max_tokens)
    stream = EventStream(state, session, cls, prompt_ids, sampling, ephemeral=True).submit()
    completion_id, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

    if not body.stream:
        event = await wait_unless_disconnected(request, stream)
        if event is None:
            return JSONResponse(error_body("cancelled", "client disconnected"), 499)
        if isinstance(event, Failed):
            return JSONResponse(error_body("generation_failed", event.message), 500)
        out = _chunk(completion_id, created, state.model_name, event.generated_text, _FINISH[event.finish_reason])
        out["usage"] = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                        "total_tokens": event.prompt_tokens + event.completion_tokens}
        return out

    async def events():
        try:
            async for event in stream:
                if isinstance(event, TokenOut):
                    if event.text:
                        yield {"data": json.dumps(_chunk(completion_id, created, state.model_name, event.text, None))}
                elif isinstance(event, Finished):
                    yield {"data": json.dumps(_chunk(completion_id, created, state.model_name, "",
                                                     _FINISH[event.finish_reason]))}
                    yield {"data": "[DONE]"}
                else:
                    yield {"data": json.dumps(error_body("generation_failed", event.message))}
        finally:
            stream.cancel()

    return EventSourceResponse(events(), ping=15)
