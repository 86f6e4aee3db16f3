"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server drains before it exits.

1. `/ready` answers 503 and new requests get 503 (orchestrators stop routing here);
2. requests already in (running or queued) go on for up to `drain_s` seconds;
3. whatever is still in then ends with an error event "the server is shutting down" (a 503 body
   when it is not streaming), so that no stream is cut without a last event;
4. once every response is out, uvicorn stops and the process exits 0.

A second signal during the drain skips what is left of it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from starlette.concurrency import run_in_threadpool

from .state import ServerState

log = logging.getLogger("toyllm.server")

# After the engine has answered everything: how long the responses get to reach their clients.
FLUSH_S = 5.0


async def drain(state: ServerState, timeout_s: float) -> None:
    """Stop taking requests, let those in finish for up to timeout_s, fail the rest, flush."""
    state.shutting_down = True
    engine = state.engine
    if engine is None:
        return
    engine.close()
    log.info("shutting down: draining %d running and %d waiting requests (up to %.0f s)", engine.running,
             engine.waiting, timeout_s)
    deadline = time.monotonic() + timeout_s
    while not engine.idle and time.monotonic() < deadline and not state.drain_now.is_set():
        await asyncio.sleep(0.05)
    if not engine.idle:
        log.warning("drain time is over: %d requests end with 'the server is shutting down'",
                    engine.running + engine.waiting)
    await run_in_threadpool(engine.stop)  # answers anything still in
    flush_until = time.monotonic() + FLUSH_S
    while state.in_flight > 0 and time.monotonic() < flush_until:
        await asyncio.sleep(0.02)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose exit signal drains the app first (and which then exits 0: it does
    not re-raise the signal as uvicorn does)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._draining = False
        state.request_exit = self._exit_now

    def handle_exit(self, sig, frame) -> None:  # a signal handler: runs on the main (event loop) thread
        if self._draining or not self.state.ready:
            self.state.drain_now.set()  # a second signal, or nothing to drain yet
            self.should_exit = True
            return
        self._draining = True
        asyncio.get_event_loop().call_soon_threadsafe(asyncio.ensure_future, self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state, self.state.settings.drain_s)
        finally:
            self.should_exit = True

    def _exit_now(self) -> None:
        self.should_exit = True
