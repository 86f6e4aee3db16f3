"""Sessions across requests: the core's `Session` (tokens, pending token, chat history, hot and
cold tiers) with an id, a busy flag and its times, and the store that holds them.

While a request runs, the session's tiers live in the engine and the session is busy. Idle sessions
expire after a TTL and are evicted least-recently-used when there are more than `max_sessions`. When
their tiers together hold more than `max_cache_bytes`, they move down the memory-pressure ladder
(`server.pressure`: compressed, demoted, and dropped only last); the store picks each step's
session and commits its result.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from toyllm_core.serving.engine import CacheClass
from toyllm_core.serving.session import Session as CoreSession

# A proposed id must look like one of ours: URL-safe, at least 128 bits' worth of characters.
_ID = re.compile(r"[A-Za-z0-9_-]{22,64}")


@dataclass(frozen=True, eq=False)
class Rung:
    """What an idle session holds at a rung of the memory-pressure ladder (its tiers by identity)."""

    rung: int
    cache: object
    cold: object

    def __eq__(self, other) -> bool:
        return self.rung == other.rung and self.cache is other.cache and self.cold is other.cold


class SessionNotFound(KeyError):
    pass


class SessionBusy(RuntimeError):
    pass


@dataclass(eq=False, kw_only=True)
class Session(CoreSession):
    id: str
    bytes_per_token: int
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    busy: bool = False
    capacity: int = 0  # allocated slots of the idle hot cache
    rung: int = 0  # memory pressure: 0 as its last turn left it, 1 compressed, 2 demoted (`server.pressure`)

    @property
    def bytes(self) -> int:
        """Both tiers."""
        return sum(self.tier_bytes(self.bytes_per_token).values())

    @property
    def full_bytes(self) -> int:
        return self.tokens_in_cache * self.bytes_per_token

    def stats(self) -> dict:
        full, tiers = self.full_bytes, self.tier_bytes(self.bytes_per_token)
        total = sum(tiers.values())
        return {"policy": self.policy.name, "budget": self.policy.budget if self.policy.evicts else None,
                "tokens_seen": self.tokens_in_cache, "tokens_kept": self.length, "bytes": total,
                "full_bytes": full, "compression_ratio": full / total if total else 1.0,
                "tokens_cold": self.cold_tokens, "hot_bytes": tiers["hot"], "cold_bytes": tiers["cold"],
                "reselections": self.reselections, "tokens_recalled": round(self.tokens_recalled, 2)}

    def memory(self) -> dict:
        """Where the session stands on the memory-pressure ladder."""
        return {"state": ("resident", "compressed", "demoted")[self.rung],
                "hot_bits": (self.cache.bits or 16) if self.cache is not None else None,
                "cold_bits": self.cold.bits if self.cold is not None else None}


class SessionStore:
    """Thread-safe: routes create and acquire sessions, the engine thread releases them."""

    def __init__(self, max_sessions: int, ttl_s: float, max_cache_bytes: int, bytes_per_token: int,
                 on_created=lambda: None, on_evicted=lambda reason: None, on_pressure=None):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_cache_bytes = max_cache_bytes
        self.bytes_per_token = bytes_per_token
        self._on_created = on_created
        self._on_evicted = on_evicted
        # Called (from the releasing thread) when the idle tiers pass max_cache_bytes: wakes the
        # memory-pressure worker. None: evict least recently used sessions at once instead.
        self.on_pressure = on_pressure
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def create(self, cls: CacheClass, busy: bool = False, proposed_id: str | None = None) -> Session:
        """A new session (busy at once when a request is about to use it).

        `proposed_id` is an id a routing proxy minted (see deploy/nginx): used when it is well
        formed and free, so that the proxy can route the session's later requests here.
        """
        with self._lock:
            usable = proposed_id is not None and _ID.fullmatch(proposed_id) and proposed_id not in self._sessions
            session = Session(cls, id=proposed_id if usable else secrets.token_urlsafe(16),
                              bytes_per_token=self.bytes_per_token, busy=busy)
            self._evict_idle(lambda: len(self._sessions) >= self.max_sessions, "max_sessions")
            self._sessions[session.id] = session
        self._on_created()
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            return self._get(session_id)

    def _get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"session {session_id!r} does not exist (never created, deleted or expired)") \
                from None

    def acquire(self, session_id: str) -> Session:
        """Mark a session busy for one request; SessionBusy if another request has it."""
        with self._lock:
            session = self._get(session_id)
            if session.busy:
                raise SessionBusy(f"session {session_id!r} is busy with another request; retry when it finishes")
            session.busy = True
            session.last_used_at = time.time()
            self._sessions.move_to_end(session_id)
            return session

    @contextmanager
    def holding(self, session_id: str) -> Iterator[Session]:
        """Hold a session while reading its cache (SessionBusy if a request has it), so that no
        request takes the cache meanwhile; unlike `acquire`, it does not count as use."""
        with self._lock:
            session = self._get(session_id)
            if session.busy:
                raise SessionBusy(f"session {session_id!r} is busy with a request; its cache is in use")
            session.busy = True
        try:
            yield session
        finally:
            with self._lock:
                session.busy = False

    def release(self, session: Session) -> None:
        """The request using the session is over (its cache is back in the session)."""
        with self._lock:
            session.busy = False
            session.last_used_at = time.time()
            session.capacity = 0 if session.cache is None else session.cache.capacity
            session.rung = 0
            if session.id not in self._sessions:
                return
            self._sessions.move_to_end(session.id)
            over = self._total_bytes() > self.max_cache_bytes
            if over and self.on_pressure is None:
                self._evict_idle(lambda: self._total_bytes() > self.max_cache_bytes, "memory")
        if over and self.on_pressure is not None:
            self.on_pressure()

    # ------------------------------------------------------------------ the memory-pressure ladder
    def over_budget(self) -> bool:
        with self._lock:
            return self._total_bytes() > self.max_cache_bytes

    def next_down(self) -> tuple[Session, Rung] | None:
        """The idle session the next ladder step takes, the least recently used at the lowest rung
        that still has one to go, with what it holds now (None: every idle session is at the last)."""
        with self._lock:
            idle = [s for s in self._sessions.values() if not s.busy and s.cache is not None]
            for rung in range(2):
                for session in idle:  # least recently used first
                    if session.rung == rung:
                        return session, Rung(rung, session.cache, session.cold)
        return None

    def step_down(self, session: Session, was: Rung, cache, cold) -> bool:
        """Commit a ladder step's tiers, computed from what the session held (`was`); False (nothing
        changed) if a request took it, or it changed or went, meanwhile."""
        with self._lock:
            if session.busy or self._sessions.get(session.id) is not session or \
                    Rung(session.rung, session.cache, session.cold) != was:
                return False
            session.cache, session.cold, session.rung = cache, cold, was.rung + 1
            session.capacity = 0 if cache is None else cache.capacity
            return True

    def drop_idle(self) -> int | None:
        """Drop the least recently used idle session (the ladder's last step) -> its bytes, or None
        when every session is busy."""
        with self._lock:
            for session in self._sessions.values():
                if not session.busy:
                    del self._sessions[session.id]
                    self._on_evicted("memory")
                    return session.bytes
        return None

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._get(session_id)
            if session.busy:
                raise SessionBusy(f"session {session_id!r} is busy with a request; delete it when that finishes")
            del self._sessions[session_id]

    def discard(self, session: Session) -> None:
        """Drop a session that a failed request leaves unusable (no eviction counted)."""
        with self._lock:
            self._sessions.pop(session.id, None)

    def expire(self, now: float | None = None) -> int:
        """Remove idle sessions past their TTL; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            old = [s for s in self._sessions.values() if not s.busy and now - s.last_used_at > self.ttl_s]
            for s in old:
                del self._sessions[s.id]
                self._on_evicted("ttl")
        return len(old)

    def _evict_idle(self, too_many, reason: str) -> None:
        for session in list(self._sessions.values()):  # least recently used first
            if not too_many():
                return
            if not session.busy:
                del self._sessions[session.id]
                self._on_evicted(reason)

    def _total_bytes(self) -> int:
        return sum(s.bytes for s in self._sessions.values())

    def snapshot(self) -> dict:
        """What the metrics read: per policy (kept bytes, full-equivalent bytes), idle capacity bytes."""
        with self._lock:
            sessions = list(self._sessions.values())
        per_policy: dict[str, tuple[int, int]] = {}
        tiers = {"hot": 0, "cold": 0}
        for s in sessions:
            kept, full = per_policy.get(s.policy.name, (0, 0))
            per_policy[s.policy.name] = (kept + s.bytes, full + s.full_bytes)
            for tier, n in s.tier_bytes(self.bytes_per_token).items():
                tiers[tier] += n
        idle_capacity = sum(s.capacity for s in sessions if not s.busy) * self.bytes_per_token
        return {"sessions": len(sessions), "cache_bytes": per_policy, "idle_capacity_bytes": idle_capacity,
                "tier_bytes": tiers}
