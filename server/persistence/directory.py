"""Session blobs in a local directory: one file per session, written to a temporary name and renamed
(atomic on POSIX), so a crash mid-write leaves the last whole blob. One server uses a directory;
its leases are in-process (the session store's busy flag already makes one request at a time)."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # session ids are URL-safe: no path can be named


class DirectoryBackend:
    shared = False  # one server: its own copy of a session is always the latest

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def _file(self, session_id: str) -> Path:
        if not _ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.path / f"{session_id}.session"

    def save(self, session_id: str, blob: bytes, generation: int) -> None:
        target = self._file(session_id)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, session_id: str) -> bytes | None:
        if not _ID.fullmatch(session_id):  # no session of ours has such an id
            return None
        try:
            return self._file(session_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, session_id: str) -> None:
        if _ID.fullmatch(session_id):
            self._file(session_id).unlink(missing_ok=True)

    def list(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.session"))

    def sweep(self, ttl_s: float, keep: set[str]) -> int:
        """Delete the blobs not written for `ttl_s` seconds (sessions spilled or left by an earlier
        process that nobody used since), but those in `keep`; returns how many."""
        cutoff, gone = time.time() - ttl_s, 0
        for path in self.path.glob("*.session"):
            try:
                if path.stem not in keep and path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                pass
        return gone

    def lease(self, session_id: str, holder: str, ttl_s: float) -> bool:
        return True

    def renew(self, session_id: str, holder: str, ttl_s: float) -> None:
        pass

    def release(self, session_id: str, holder: str) -> None:
        pass

    def generation(self, session_id: str) -> int | None:
        return None

    def close(self) -> None:
        pass
