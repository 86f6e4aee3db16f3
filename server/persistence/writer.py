"""`Persistence`: when sessions are written and read.

- After each finished turn the session is written behind, on a thread of its own (never the engine
  thread or the event loop): `save_later` takes a snapshot (its tiers are never changed in place,
  its token list and messages are copied) and the writer serialises and writes the latest one.
- At shutdown `flush` writes whatever is still pending; memory pressure's last step writes an idle
  session (`save_now`) and frees it instead of dropping it.
- A request for a session this process does not hold (a restart, another replica's session) loads
  it (`load`); a blob that does not verify raises `SessionLost`, and nothing of it is loaded.
- A shared backend (Redis) leases a session to one request on one replica at a time (`lease`,
  renewed while held, expiring by itself if the replica dies), and a replica holding a session
  that another replica has written since reloads it (`generation`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from toyllm_core.serving.engine import CacheClass
from toyllm_core.serving.snapshot import BlobError, dumps, loads

from .backend import Backend

log = logging.getLogger("toyllm.server")


class SessionLost(RuntimeError):
    """A stored session that cannot be loaded (its blob does not verify, or its class is not served)."""


class Persistence:
    def __init__(self, backend: Backend, classes: list[CacheClass], bytes_per_token: int, holder: str,
                 model: str, lease_ttl_s: float = 30.0, on_saved=lambda: None):
        self.backend = backend
        self.model = model  # the weights' identity: a blob another model wrote is not loaded
        self.classes = classes
        self.bytes_per_token = bytes_per_token
        self.holder = holder  # this replica, in leases
        self.lease_ttl_s = lease_ttl_s
        self._pending: dict[str, object] = {}  # session id -> its latest snapshot not yet written
        self._writing = 0
        self._stored: set[str] = set()  # ids whose blob this process wrote or read (and has not deleted)
        self._in_flight: set[str] = set()
        self._held: set[str] = set()  # leases this replica holds
        self._cond = threading.Condition()
        self._stopping = False
        self.on_saved = on_saved
        self._thread = threading.Thread(target=self._run, name="toyllm-session-writer", daemon=True)
        self._heartbeat = threading.Thread(target=self._renew, name="toyllm-session-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._heartbeat.start()

    def stop(self) -> None:
        self.flush()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.backend.close()

    # ----------------------------------------------------------------------------- writing
    @staticmethod
    def snapshot(session):
        """What a write needs, taken under the store's lock: the session with its own token list and
        messages (the next turn appends to the session's)."""
        chat = None if session.chat is None else [dict(m) for m in session.chat]
        return dataclasses.replace(session, tokens=list(session.tokens), chat=chat)

    def save_later(self, session) -> None:
        snap = self.snapshot(session)
        with self._cond:
            self._pending[session.id] = snap
            self._cond.notify_all()

    def save_now(self, snap) -> None:
        """Write a snapshot on the calling thread."""
        blob = dumps(snap, {"id": snap.id, "created_at": snap.created_at, "last_used_at": snap.last_used_at,
                            "owner": getattr(snap, "owner", None), "generation": snap.generation,
                            "model": self.model})
        self.backend.save(snap.id, blob, snap.generation)
        with self._cond:
            self._stored.add(snap.id)
        self.on_saved()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every pending write is done (False if `timeout` passed first)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending:
                    return
                session_id, snap = next(iter(self._pending.items()))
                del self._pending[session_id]
                self._writing += 1
                self._in_flight.add(session_id)
            try:
                self.save_now(snap)
            except Exception:
                log.exception("writing session %s failed", session_id)
            finally:
                with self._cond:
                    self._writing -= 1
                    self._in_flight.discard(session_id)
                    self._cond.notify_all()

    def expire(self, session_id: str) -> None:
        """The session's TTL passed here. A shared backend expires its blobs by itself (another
        replica may have used the session since); a local directory forgets it now."""
        if not self.backend.shared:
            self.forget(session_id)

    def forget(self, session_id: str) -> None:
        """The session is gone (deleted, expired): no pending write, no blob."""
        with self._cond:
            self._pending.pop(session_id, None)
            self._stored.discard(session_id)
        self.backend.delete(session_id)

    # ----------------------------------------------------------------------------- reading
    def load(self, session_id: str) -> tuple[dict, dict] | None:
        """(Session keyword arguments, the blob's extra) for a stored session; None if none is stored;
        SessionLost if its blob does not verify."""
        blob = self.backend.load(session_id)
        if blob is None:
            return None
        try:
            fields, extra = loads(blob, self.classes)
            if extra.get("model") != self.model:
                raise BlobError(f"it was written by another model ({extra.get('model')!r}, not {self.model!r})")
            with self._cond:
                self._stored.add(session_id)
            return fields, extra
        except BlobError as e:
            log.warning("session %s is lost: %s", session_id, e)
            raise SessionLost(f"session {session_id!r} is lost: {e}") from None

    def generation(self, session_id: str) -> int | None:
        """The generation of the session's stored blob, where replicas share the backend (None: this
        process's copy is the latest by construction)."""
        return self.backend.generation(session_id)

    def gone_elsewhere(self, session_id: str, stored_generation: int | None) -> bool:
        """Whether a session this process holds was deleted (or expired) in a shared backend by
        another replica: its blob was there (this process wrote or read it), no write of it is
        pending here, and the backend has none now (`stored_generation` -1)."""
        if stored_generation != -1:
            return False
        with self._cond:
            return session_id in self._stored and session_id not in self._pending \
                and session_id not in self._in_flight

    # ----------------------------------------------------------------------------- leases
    def lease(self, session_id: str) -> bool:
        if not self.backend.lease(session_id, self.holder, self.lease_ttl_s):
            return False
        with self._cond:
            self._held.add(session_id)
        return True

    def release(self, session_id: str) -> None:
        with self._cond:
            self._held.discard(session_id)
        self.backend.release(session_id, self.holder)

    def _renew(self) -> None:
        while not self._stopping:
            time.sleep(self.lease_ttl_s / 3)
            with self._cond:
                held = list(self._held)
            for session_id in held:
                try:
                    self.backend.renew(session_id, self.holder, self.lease_ttl_s)
                except Exception:
                    log.exception("renewing the lease of session %s failed", session_id)
