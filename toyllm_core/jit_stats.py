"""Counts the programs this process builds: a program built on the serving path is an event worth
counting. A program is built when a jitted function meets shapes it has not run before; XLA then
compiles it, or reads it from JAX's persistent compilation cache where a process enabled one. (The
server's warm-up loads what it built before from its own store, `serving.executables`, which
builds nothing.)"""

from __future__ import annotations

import threading

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_compiled = 0  # programs built
_read = 0  # of them, read from the persistent cache


def _on_duration(event: str, duration: float, **_: object) -> None:
    global _compiled
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _compiled += 1


def _on_event(event: str, **_: object) -> None:
    global _read
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _read += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def compilations() -> int:
    """Programs built so far in this process: compiled, or read from the persistent cache (JAX
    times both as one backend compile)."""
    return _compiled


def cache_hits() -> int:
    """Of those, programs read from the persistent compilation cache instead of compiled."""
    return _read
