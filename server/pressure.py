"""Memory pressure: when the idle sessions' tiers pass `max_cache_bytes`, they move down a ladder,
least recently used first, and a session is dropped only when no idle session can give up more.

| step | a session with a cold tier | any other session | bytes of its tiers |
|---|---|---|---|
| compressed | its hot tier, but the sinks and recent window, moves into the cold tier (int8) | its parked hot tier quantised to int8 | about half |
| demoted | its cold tier re-quantised to int4 | its hot tier to int4 | about a quarter |
| spilled | where sessions are stored (server.persistence): written, and freed here; the next request loads it | | none here |
| dropped | otherwise: the session is removed (404 from then on) | | none |

Every idle session is compressed before any is demoted, and every one demoted before any is
dropped. Nothing a step keeps is lost but precision: a session's next turn takes its tiers back
(`Session.begin`: the hot tier unparked at full width, the cold tier back at its class's bits), and
for a session with a cold tier the question re-selects the hot set over both, so what went cold
comes back where the question needs it. A session used again starts at the top of the ladder.

The steps run on a worker thread of their own, on host copies (`parking`): never on the engine
thread, so no stream waits for them. A step reads a session's tiers, which are never changed in
place, computes the smaller ones, and commits them only if no request took the session meanwhile
(`SessionStore.step_down`); otherwise its work is thrown away.
"""

from __future__ import annotations

import logging
import threading

from .sessions import Rung, Session, SessionStore

log = logging.getLogger("toyllm.server")

STEPS = ("compressed", "demoted")  # rungs 1 and 2 (0: as the last turn left it)


def step_down(session: Session, was: Rung):
    """The tiers `was` (what `session` held) one rung down -> (hot, cold); pure."""
    hot, cold, policy = was.cache, was.cold, session.policy
    tiered = session.cls.tiered and cold is not None
    if was.rung == 0:
        if tiered and hot is not None:
            hot, cold, _ = hot.split_cold(cold, policy.sink_size, policy.window_size)
        elif hot is not None:
            hot = hot.quantized(8)
    elif tiered:
        cold = cold.requantized(4)
    elif hot is not None:
        hot = hot.quantized(4)
    return hot, cold


class PressureRelief:
    """The worker that walks idle sessions down the ladder while the store is over its bytes."""

    def __init__(self, store: SessionStore, on_step=lambda step, freed: None):
        self.store = store
        self._on_step = on_step  # on_step(step name, bytes freed)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="toyllm-pressure", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            try:
                self.relieve()
            except Exception:  # a bug here must not take the server down; the next release retries
                log.exception("memory-pressure step failed")

    def relieve(self) -> int:
        """Steps until the store is within its bytes (or nothing idle is left); returns how many."""
        steps = 0
        while not self._stopping and self.store.over_budget():
            found = self.store.next_down()
            if found is None:
                dropped = self.store.drop_idle()
                if dropped is None:
                    return steps  # every session is busy: the next release wakes us
                self._on_step(*dropped)
            else:
                session, was = found
                before = session.bytes
                hot, cold = step_down(session, was)
                if self.store.step_down(session, was, hot, cold):
                    self._on_step(STEPS[was.rung], max(0, before - session.bytes))
            steps += 1
        return steps
