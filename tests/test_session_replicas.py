"""Replicas sharing sessions through a real Redis (Debian's redis-server, started here and stopped
after): a session made on A continues on B; two requests racing for one session on A and B: one
gets 409; A killed with SIGKILL mid-turn loses no finished turn, and once its lease expires the
session continues on B from its last finished turn. (make test-deploy installs redis-server.)"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import httpx
import pytest
from server_utils import free_port

from server.subprocess_server import serve

pytestmark = pytest.mark.deploy

LEASE_S = 2.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test-deploy installs it: apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.time() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def _env(url: str) -> dict:
    return {"TOYLLM_PRESET": "tiny", "TOYLLM_WARMUP": "false", "TOYLLM_DTYPE": "float32",
            "TOYLLM_SESSION_STORE": url, "TOYLLM_SESSION_LEASE_S": str(LEASE_S), "TOYLLM_COMPILE_CACHE_DIR": ""}


def _generate(url: str, sid: str | None, prompt: str, n: int = 6) -> httpx.Response:
    body = {"prompt": prompt, "max_new_tokens": n, "temperature": 0, "ignore_eos": True, "stream": False}
    if sid:
        body["session_id"] = sid
    return httpx.post(url + "/generate", json=body, timeout=300)


def test_replicas_share_sessions_through_redis(redis_url, tmp_path):
    with serve(_env(redis_url), tmp_path / "a.log") as (a, proc_a), serve(_env(redis_url), tmp_path / "b.log") as (b, _):
        r = _generate(a, None, "the river and the music of the hills")
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        seen = r.json()["cache"]["tokens_seen"]
        time.sleep(0.5)  # written behind the turn
        r = _generate(b, sid, "and a long road")  # made on A, continued on B
        assert r.status_code == 200, r.text
        assert r.json()["cache"]["tokens_seen"] > seen
        assert httpx.get(f"{b}/sessions/{sid}").json()["turns"] == 2
        time.sleep(0.5)
        after_two = httpx.get(f"{b}/sessions/{sid}").json()["cache"]["tokens_seen"]

        # Deleted on one replica, gone from all: A held its own copy in memory.
        other = _generate(a, None, "a second session").json()["session_id"]
        time.sleep(0.5)
        assert httpx.get(f"{b}/sessions/{other}").status_code == 200  # B loads it
        assert httpx.delete(f"{b}/sessions/{other}").status_code == 204
        assert httpx.get(f"{a}/sessions/{other}").status_code == 404
        assert _generate(a, other, "and on").status_code == 404

        # A long turn on A holds the session: B's request for it gets 409 while it runs.
        long_turn = {}
        thread = threading.Thread(target=lambda: long_turn.update(r=_try(a, sid)))
        thread.start()
        deadline = time.time() + 60
        while time.time() < deadline and httpx.get(f"{a}/sessions/{sid}").json()["busy"] is not True:
            time.sleep(0.02)
        assert httpx.get(f"{a}/sessions/{sid}").json()["turns"] == 2  # A reloaded B's turn first
        raced = _generate(b, sid, "me too")
        assert raced.status_code == 409, raced.text

        # A dies mid-turn: no finished turn is lost; after A's lease expires, B goes on from turn 2.
        proc_a.kill()
        proc_a.wait(10)
        thread.join(30)
        deadline = time.time() + LEASE_S * 5
        while True:
            r = _generate(b, sid, "still there")
            if r.status_code != 409 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        info = httpx.get(f"{b}/sessions/{sid}").json()
        assert info["turns"] == 3
        usage = r.json()["usage"]  # the killed turn is not in it: turn 2's tokens, then this turn's
        assert info["cache"]["tokens_seen"] == after_two + usage["prompt_tokens"] + usage["completion_tokens"]


def _try(url: str, sid: str):
    try:
        return _generate(url, sid, "tell a very long story", n=2000)
    except httpx.HTTPError as e:  # the replica was killed under it
        return e
