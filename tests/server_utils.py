"""Helpers for the server tests: in-process apps on the tiny random model, SSE parsing."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

# The cache classes the in-process tests use (a request for anything else gets 422).
TEST_CLASSES = ["full", "h2o:budget=32", "streaming:budget=48", "snapkv:budget=24,sink_size=4,window_size=8,slack=8"]


def tiny_settings(**changes) -> Settings:
    # A small cold-tier bound: two re-selection buckets per compressing class to warm, not six.
    return Settings(**{"preset": "tiny", "warmup": False, "max_concurrent_requests": 4, "dtype": "float32",
                       "cache_classes": TEST_CLASSES, "cold_tokens": 512, "compile_cache_dir": "",
                       "session_dir": "",  # in memory only, unless a test stores sessions
                       **changes})


def ready_client(**changes) -> TestClient:
    """A TestClient (enter it with `with`) whose app is loaded; use as a context manager."""
    return TestClient(create_app(tiny_settings(**changes)))


def wait_ready(client, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("the server did not become ready")


def parse_sse(text: str) -> list[tuple[str, dict | str]]:
    """[(event, data)] from a text/event-stream body (pings and comments skipped)."""
    events = []
    for block in re.split(r"\r?\n\r?\n", text):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            raw = "\n".join(data)
            try:
                events.append((name, json.loads(raw)))
            except json.JSONDecodeError:
                events.append((name, raw))
    return events


def metric(text: str, name: str, /, **labels) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if got == want:
            return float(value)
    return 0.0


def background_stream(client, body: dict):
    """Start a streaming POST /generate in a thread; returns (thread, started, result): `started` is
    set at its first token, result["status"] holds the status code once it ends."""
    import threading

    started, result = threading.Event(), {}

    def run():
        with client.stream("POST", "/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    started.set()
            result["status"] = r.status_code

    thread = threading.Thread(target=run)
    thread.start()
    return thread, started, result


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(env: dict, log_path, timeout: float = 300.0):
    """A `toyllm serve` subprocess on a free port with `env` added; yields its URL once /ready is 200."""
    from server.subprocess_server import serve

    env = {"TOYLLM_SESSION_DIR": "", **env}  # sessions in memory only, unless the test stores them
    with serve(env, log_path, timeout) as (url, proc):
        live_server.process = proc  # for tests that signal it
        yield url
