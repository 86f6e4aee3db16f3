"""What a session backend does: keep blobs by session id, and lease a session to one holder at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    shared: bool  # several replicas use it (then a process's copy of a session may be stale)

    def save(self, session_id: str, blob: bytes, generation: int) -> None:
        """Write a session's blob (replacing the last one whole: a reader never sees half of one);
        `generation` counts the session's writes (a replica compares it with its own copy's)."""

    def load(self, session_id: str) -> bytes | None:
        """A session's blob, or None if the backend has none."""

    def delete(self, session_id: str) -> None:
        """Forget a session (no error if it is not there)."""

    def list(self) -> list[str]:
        """Every session id the backend holds."""

    def sweep(self, ttl_s: float, keep: set[str]) -> int:
        """Forget sessions not written for `ttl_s` seconds (their TTL), but those in `keep` (held in
        memory: the store expires them itself); returns how many."""

    def lease(self, session_id: str, holder: str, ttl_s: float) -> bool:
        """Take the session for `holder` (one request on one replica) until `release` or `ttl_s`
        seconds; False if another holder has it."""

    def renew(self, session_id: str, holder: str, ttl_s: float) -> None:
        """Extend `holder`'s own lease (a request still running) to `ttl_s` from now."""

    def release(self, session_id: str, holder: str) -> None:
        """Give a lease back (only `holder`'s own)."""

    def generation(self, session_id: str) -> int | None:
        """The stored generation where replicas share the backend (-1: not stored); None where this
        process's copy is always the latest (a local directory)."""

    def close(self) -> None: ...


def open_backend(url: str, ttl_s: float | None = None) -> Backend:
    """`redis://...` (or `rediss://`): a Redis server, whose blobs expire `ttl_s` after their last
    write; anything else: a local directory."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBackend

        return RedisBackend(url, ttl_s)
    from .directory import DirectoryBackend

    return DirectoryBackend(Path(url).expanduser())
