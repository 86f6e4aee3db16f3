"""`toyllm serve` in a subprocess on a free localhost port, for the live tests and the start-up
benchmark: started, waited for until `/ready` answers 200, stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class NotReady(RuntimeError):
    """The server exited, or did not answer /ready 200 in time; the message ends with its log."""


@contextlib.contextmanager
def serve(env: dict, log_path: str | Path, timeout: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yields (URL, process) once /ready answers 200; `env` is added to this process's environment.
    The server is sent SIGTERM on the way out (if it still runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(log_path)
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise NotReady(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise NotReady(f"not ready after {timeout} s:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
