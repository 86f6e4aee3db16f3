"""Liveness, readiness, server information and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from toyllm_core.machine import peak_rss_bytes, rss_bytes

from ..deps import State, require_api_key
from ..errors import error_body, responses

router = APIRouter(tags=["health"])


@router.get("/health", responses=responses(503))
@router.head("/health", responses=responses(503))
async def health(state: State):
    """The process is alive (says nothing about the model), unless the model failed to load: 503
    with the reason (`toyllm serve` exits then; this is for servers run another way)."""
    if state.load_error:
        return JSONResponse(error_body("unavailable", f"the model failed to load: {state.load_error}"), 503)
    return {"status": "ok"}


@router.get("/ready", responses=responses(503))
@router.head("/ready", responses=responses(503))
async def ready(state: State):
    """200 once the model is loaded and warmed up; 503 before that and while shutting down."""
    if state.ready and not state.shutting_down:
        return {"status": "ready", "model": state.model_name}
    if state.load_error:
        message = f"the model failed to load: {state.load_error}"
    elif state.shutting_down:
        message = "the server is shutting down"
    else:
        message = "the model is loading or warming up"
    return JSONResponse(error_body("unavailable", message), 503, headers={"Retry-After": "5"})


@router.get("/info", dependencies=[Depends(require_api_key)], responses=responses(401))
async def info(state: State):
    """The served model, its checkpoint, the cache policies and the server's limits."""
    phases = state.info.get("peak_rss_bytes", {})
    if state.ready:
        phases = {**phases, "serving": peak_rss_bytes()}
    return {**state.info, "ready": state.ready, "peak_rss_bytes": phases, "rss_bytes": rss_bytes()}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format."}})
async def metrics(state: State):
    """Prometheus metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
