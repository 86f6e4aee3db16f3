"""Session blobs in Redis, shared by replicas: `toyllm:session:<id>` holds a blob, the set
`toyllm:sessions` the ids, and `toyllm:lease:<id>` the holder of a session's lease (SET NX PX: it
expires by itself if its replica dies; given back only by its holder, checked in Redis)."""

from __future__ import annotations

import redis

_BLOB, _INDEX, _LEASE, _GENERATION = "toyllm:session:", "toyllm:sessions", "toyllm:lease:", "toyllm:generation:"
# Give back, or extend, the lease only if it is still ours (atomic in Redis).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")


class RedisBackend:
    shared = True  # replicas: a copy in memory may be older than the stored one

    def __init__(self, url: str, ttl_s: float | None = None):
        self.client = redis.Redis.from_url(url)
        self.ttl_s = ttl_s  # a blob not written again for this long expires (the sessions' TTL)
        self.client.ping()  # fail at start-up, not at the first turn
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)

    def save(self, session_id: str, blob: bytes, generation: int) -> None:
        with self.client.pipeline() as p:  # MULTI/EXEC: the blob, its generation and the index together
            ex = None if self.ttl_s is None else max(1, int(self.ttl_s))
            p.set(_BLOB + session_id, blob, ex=ex)
            p.set(_GENERATION + session_id, generation, ex=ex)
            p.sadd(_INDEX, session_id)
            p.execute()

    def load(self, session_id: str) -> bytes | None:
        return self.client.get(_BLOB + session_id)

    def delete(self, session_id: str) -> None:
        with self.client.pipeline() as p:
            p.delete(_BLOB + session_id, _GENERATION + session_id)
            p.srem(_INDEX, session_id)
            p.execute()

    def list(self) -> list[str]:
        return sorted(x.decode() for x in self.client.smembers(_INDEX))

    def sweep(self, ttl_s: float, keep: set[str]) -> int:
        """Blobs expire in Redis by themselves; the index forgets the ids whose blob has gone."""
        ids = self.list()
        with self.client.pipeline() as p:
            for session_id in ids:
                p.exists(_BLOB + session_id)
            there = p.execute()
        gone = [i for i, ok in zip(ids, there, strict=True) if not ok]
        if gone:
            self.client.srem(_INDEX, *gone)
        return len(gone)

    def lease(self, session_id: str, holder: str, ttl_s: float) -> bool:
        return bool(self.client.set(_LEASE + session_id, holder, nx=True, px=max(1, int(ttl_s * 1000))))

    def renew(self, session_id: str, holder: str, ttl_s: float) -> None:
        self._renew(keys=[_LEASE + session_id], args=[holder, max(1, int(ttl_s * 1000))])

    def release(self, session_id: str, holder: str) -> None:
        self._release(keys=[_LEASE + session_id], args=[holder])

    def generation(self, session_id: str) -> int | None:
        value = self.client.get(_GENERATION + session_id)
        return int(value) if value is not None else -1  # -1: not stored (deleted or expired)

    def close(self) -> None:
        self.client.close()
