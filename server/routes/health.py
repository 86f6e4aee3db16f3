"""Liveness, readiness, server information and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import State, require_api_key
from ..errors import error_body

router = APIRouter(tags=["health"])


@router.get("/health")
async def health():
    """The process is alive (says nothing about the model)."""
    return {"status": "ok"}


@router.get("/ready")
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


@router.get("/info", dependencies=[Depends(require_api_key)])
async def info(state: State):
    """The served model, its checkpoint, the cache policies and the server's limits."""
    return {**state.info, "ready": state.ready}


@router.get("/metrics")
async def metrics(state: State):
    """Prometheus metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
