"""Counts XLA compilations in this process: a compile on the serving path is an event worth counting."""

from __future__ import annotations

import threading

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0


def _on_event(event: str, duration: float, **_: object) -> None:
    global _count
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1


monitoring.register_event_duration_secs_listener(_on_event)


def compilations() -> int:
    """XLA backend compilations so far in this process."""
    return _count
