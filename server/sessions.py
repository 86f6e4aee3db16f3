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

from .clients import QuotaExceeded
from .persistence import Persistence, SessionLost

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
    generation: int = 0  # finished turns written to the session backend (replicas compare it)
    owner: str | None = None  # the client that made it
    leased: bool = False  # this replica holds the backend's lease for the running request
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
                "reselections": self.reselections, "tokens_recalled": round(self.tokens_recalled, 2),
                "compressions": self.compressions, "tokens_evicted": self.tokens_evicted}

    def memory(self) -> dict:
        """Where the session stands on the memory-pressure ladder."""
        return {"state": ("resident", "compressed", "demoted")[self.rung],
                "hot_bits": (self.cache.bits or 16) if self.cache is not None else None,
                "cold_bits": self.cold.bits if self.cold is not None else None}


class SessionStore:
    """Thread-safe: routes create and acquire sessions, the engine thread releases them."""

    def __init__(self, max_sessions: int, ttl_s: float, max_cache_bytes: int, bytes_per_token: int,
                 on_created=lambda: None, on_evicted=lambda reason: None, on_pressure=None,
                 persistence: Persistence | None = None, on_loaded=lambda: None,
                 client_max_sessions: int | None = None, client_max_cache_bytes: int | None = None):
        self.max_sessions = max_sessions
        self.client_max_sessions = client_max_sessions  # each client's share (server/clients.py)
        self.client_max_cache_bytes = client_max_cache_bytes
        self.ttl_s = ttl_s
        self.max_cache_bytes = max_cache_bytes
        self.bytes_per_token = bytes_per_token
        self._on_created = on_created
        self._on_evicted = on_evicted
        # Called (from the releasing thread) when the idle tiers pass max_cache_bytes: wakes the
        # memory-pressure worker. None: evict least recently used sessions at once instead.
        self.on_pressure = on_pressure
        # Sessions outlive the process (server.persistence): written after each turn, loaded on a miss.
        self.persistence = persistence
        self.on_loaded = on_loaded
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def create(self, cls: CacheClass, busy: bool = False, proposed_id: str | None = None,
               owner: str | None = None) -> Session:
        """A new session (busy at once when a request is about to use it).

        `proposed_id` is an id a routing proxy minted (see deploy/nginx): used when it is well
        formed and free, so that the proxy can route the session's later requests here.
        """
        with self._lock:
            usable = proposed_id is not None and _ID.fullmatch(proposed_id) and proposed_id not in self._sessions
            session = Session(cls, id=proposed_id if usable else secrets.token_urlsafe(16),
                              bytes_per_token=self.bytes_per_token, busy=busy, owner=owner)
            if owner is not None and self.client_max_sessions is not None:
                mine = lambda: sum(s.owner == owner for s in self._sessions.values())
                self._evict_idle(lambda: mine() >= self.client_max_sessions, "quota", owner)
                if mine() >= self.client_max_sessions:
                    raise QuotaExceeded(f"this client holds {mine()} sessions, its share, and every one is "
                                        "busy; retry when one finishes, or delete one")
            self._evict_idle(lambda: len(self._sessions) >= self.max_sessions, "max_sessions")
            self._sessions[session.id] = session
        self._on_created()
        return session

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """A session, loaded from the backend if this process does not hold it (or holds an older
        copy than another replica wrote). SessionNotFound (also when `owner` is given and the
        session is another client's); SessionLost if its blob does not verify."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None and self.persistence is not None and not session.busy:
            stored = self.persistence.generation(session_id)
            if stored is not None and stored > session.generation:  # another replica went on with it
                session = self._load(session_id) or session
            elif self.persistence.gone_elsewhere(session_id, stored):  # another replica deleted it
                with self._lock:
                    if self._sessions.get(session_id) is session and not session.busy:
                        del self._sessions[session_id]
                session = None
        elif session is None:
            session = self._load(session_id)
        if session is None or (owner is not None and session.owner != owner):
            raise SessionNotFound(f"session {session_id!r} does not exist (never created, deleted or expired)")
        return session

    def _load(self, session_id: str) -> Session | None:
        """The stored session put in the table (the newest copy wins); None if none is stored."""
        if self.persistence is None:
            return None
        found = self.persistence.load(session_id)  # off the lock: disk or network
        if found is None:
            return None
        fields, extra = found
        loaded = Session(**fields, id=session_id, bytes_per_token=self.bytes_per_token,
                         created_at=extra.get("created_at", time.time()),
                         last_used_at=extra.get("last_used_at", time.time()), generation=extra.get("generation", 0),
                         owner=extra.get("owner"))
        loaded.capacity = 0 if loaded.cache is None else loaded.cache.capacity
        with self._lock:
            held = self._sessions.get(session_id)
            if held is not None and (held.busy or held.generation >= loaded.generation):
                return held
            if held is None:
                self._evict_idle(lambda: len(self._sessions) >= self.max_sessions, "max_sessions")
            self._sessions[session_id] = loaded
        self.on_loaded()
        return loaded

    def acquire(self, session_id: str, owner: str | None = None) -> Session:
        """Mark a session busy for one request (loading it if need be); SessionBusy if another
        request has it, here or, with a shared backend, on another replica."""
        session = self.get(session_id, owner)
        with self._lock:
            if self._sessions.get(session_id) is not session:
                raise SessionNotFound(f"session {session_id!r} does not exist (deleted or expired just now)")
            if session.busy:
                raise SessionBusy(f"session {session_id!r} is busy with another request; retry when it finishes")
            session.busy = True
            session.last_used_at = time.time()
            self._sessions.move_to_end(session_id)
        if self.persistence is not None:
            if not self.persistence.lease(session_id):
                with self._lock:
                    session.busy = False
                raise SessionBusy(f"session {session_id!r} is busy with a request on another replica; retry "
                                  "when it finishes")
            session.leased = True
        return session

    @contextmanager
    def holding(self, session_id: str, owner: str | None = None) -> Iterator[Session]:
        """Hold a session while reading its cache (SessionBusy if a request has it), so that no
        request takes the cache meanwhile; unlike `acquire`, it does not count as use."""
        session = self.get(session_id, owner)
        with self._lock:
            if session.busy:
                raise SessionBusy(f"session {session_id!r} is busy with a request; its cache is in use")
            session.busy = True
        try:
            yield session
        finally:
            with self._lock:
                session.busy = False

    def release(self, session: Session, turned: bool = False) -> None:
        """The request using the session is over (its cache is back in the session); `turned`: it
        finished a turn, which is written to the backend behind (server.persistence)."""
        with self._lock:
            session.busy = False
            session.last_used_at = time.time()
            session.capacity = 0 if session.cache is None else session.cache.capacity
            session.rung = 0
            held = self._sessions.get(session.id) is session
            over = False
            if held:
                self._sessions.move_to_end(session.id)
                if turned and self.persistence is not None:
                    session.generation += 1
                    self.persistence.save_later(session)  # a snapshot, taken under the lock
                if session.owner is not None and self.client_max_cache_bytes is not None:
                    owner = session.owner
                    mine = lambda: sum(s.bytes for s in self._sessions.values() if s.owner == owner)
                    self._evict_idle(lambda: mine() > self.client_max_cache_bytes, "quota", owner, keep=session)
                over = self._total_bytes() > self.max_cache_bytes
                if over and self.on_pressure is None:
                    self._evict_idle(lambda: self._total_bytes() > self.max_cache_bytes, "memory")
        if session.leased:
            session.leased = False
            self.persistence.release(session.id)
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
            if cache is not None:  # the hot tier may hold fewer slots now (moved cold)
                session.length = int(cache.length[0])
            session.capacity = 0 if cache is None else cache.capacity
            return True

    def drop_idle(self) -> tuple[str, int] | None:
        """The ladder's last step on the least recently used idle session -> ("spilled", its bytes)
        where sessions are stored (it is written, and freed here: the next request loads it), or
        ("dropped", its bytes); None when every session is busy."""
        with self._lock:
            session = next((s for s in self._sessions.values() if not s.busy), None)
            if session is None:
                return None
            if self.persistence is None:
                del self._sessions[session.id]
                self._on_evicted("memory")
                return "dropped", session.bytes
            was, snap = Rung(session.rung, session.cache, session.cold), self.persistence.snapshot(session)
        self.persistence.save_now(snap)  # off the lock: disk or network
        with self._lock:
            if session.busy or self._sessions.get(session.id) is not session or \
                    Rung(session.rung, session.cache, session.cold) != was:
                return "spilled", 0  # taken meanwhile: kept (its next turn writes it again)
            del self._sessions[session.id]
        return "spilled", session.bytes

    def delete(self, session_id: str, owner: str | None = None) -> None:
        try:
            session = self.get(session_id, owner)
        except SessionLost:  # a stored blob that does not verify: deleting it is all that is left to do
            self.persistence.forget(session_id)
            return
        with self._lock:
            if session.busy:
                raise SessionBusy(f"session {session_id!r} is busy with a request; delete it when that finishes")
            self._sessions.pop(session_id, None)
        if self.persistence is not None:
            self.persistence.forget(session_id)

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
        if self.persistence is not None:
            for s in old:
                self.persistence.expire(s.id)
            with self._lock:
                held = set(self._sessions)
            # Stored sessions this process does not hold (spilled, or from before a restart) expire too.
            self.persistence.backend.sweep(self.ttl_s, held)
        return len(old)

    def _evict_idle(self, too_many, reason: str, owner: str | None = None, keep: Session | None = None) -> None:
        """Evict idle sessions, least recently used first (only `owner`'s when given; never `keep`),
        while `too_many()`."""
        for session in list(self._sessions.values()):  # least recently used first
            if not too_many():
                return
            if owner is not None and session.owner != owner or session is keep:
                continue
            if not session.busy:
                del self._sessions[session.id]
                self._on_evicted(reason)
                if self.persistence is not None:
                    self.persistence.forget(session.id)

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
