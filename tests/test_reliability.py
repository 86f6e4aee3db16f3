"""No request can hurt another: bounded inputs, and faults injected into one request's start or one
class's decode call end only the requests they touch."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_utils import live_server, parse_sse, ready_client, wait_ready

import toyllm_core.serving.engine.engine as core_engine
from toyllm_core.serving.engine import steps


@pytest.fixture()
def client():
    with ready_client() as c:
        wait_ready(c)
        yield c


def _generate(client, **body):
    return client.post("/generate", json={"prompt": "Once upon a time", "max_new_tokens": 8, "stream": False,
                                          **body})


@pytest.mark.parametrize("field, bad, good", [("seed", 2**64, 2**64 - 1), ("seed", -1, 0),
                                              ("top_k", 2**31, 2**31 - 1)])
def test_numbers_are_bounded(client, field, bad, good):
    assert _generate(client, **{field: bad}).status_code == 422
    r = _generate(client, **{field: good}, temperature=1.0)
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"model": "random-tiny", "prompt": "x", "max_tokens": 2,
                                             "seed": 2**64})
    assert r.status_code == 422


def test_seeds_are_used_whole(client):
    texts = {_generate(client, seed=s, temperature=1.0, ignore_eos=True).json()["generated_text"]
             for s in (0, 2**32, 2**63)}
    assert len(texts) == 3


def _stream_in_thread(client, body):
    out = {}

    def run():
        with client.stream("POST", "/generate", json=body) as r:
            out["status"] = r.status_code
            out["events"] = parse_sse(r.read().decode())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _slow_full_stream(client):
    body = {"prompt": "A long story", "max_new_tokens": 400, "ignore_eos": True, "cache": {"policy": "full"}}
    return _stream_in_thread(client, body)


def test_a_request_whose_start_fails_ends_alone(client, monkeypatch):
    real = core_engine.first_token

    def first_token(logits, params, key):
        if params.seed == 13:
            raise FloatingPointError("injected sampler fault")
        return real(logits, params, key)

    monkeypatch.setattr(core_engine, "first_token", first_token)
    _slow_decode(monkeypatch)
    thread, other = _slow_full_stream(client)
    bad = _generate(client, seed=13)
    thread.join(60)
    assert bad.status_code == 500 and "injected sampler fault" in bad.json()["error"]["message"]
    assert other["status"] == 200 and other["events"][-1][0] == "done"
    assert len([e for e, _ in other["events"] if e == "token"]) == 400
    assert _generate(client, seed=14).status_code == 200  # the engine goes on
    assert client.app.state.toyllm.engine.running == 0


def _slow_decode(monkeypatch, fail_capacity: int | None = None):
    """Decode calls take 5 ms more (so a stream outlives the faulty request); the first call on a cache
    of `fail_capacity` slots raises."""
    import time

    real = steps.decode_steps
    failed = []

    def decode_steps(model, state, *args, **kwargs):
        time.sleep(0.005)
        if fail_capacity is not None and state.capacity == fail_capacity and not failed:
            failed.append(True)
            raise RuntimeError("injected decode fault")
        return real(model, state, *args, **kwargs)

    monkeypatch.setattr(steps, "decode_steps", decode_steps)
    return failed


def test_a_failed_decode_call_fails_only_its_class(client, monkeypatch):
    state = client.app.state.toyllm
    snapkv = next(c for c in state.classes if c.policy.name == "snapkv")
    failed = _slow_decode(monkeypatch, fail_capacity=snapkv.capacity)
    thread, other = _slow_full_stream(client)
    bad = _generate(client, cache={"policy": "snapkv"}, max_new_tokens=32)
    thread.join(60)
    assert failed and bad.status_code == 500 and "injected decode fault" in bad.json()["error"]["message"]
    assert other["status"] == 200 and other["events"][-1][0] == "done"
    assert len([e for e, _ in other["events"] if e == "token"]) == 400
    # The failed class was rebuilt: it serves again, and nothing is left running or busy.
    again = _generate(client, cache={"policy": "snapkv"}, max_new_tokens=32)
    assert again.status_code == 200, again.text
    assert state.engine.running == 0 and not any(s.busy for s in state.store._sessions.values())


def test_the_queue_bound_holds_under_concurrent_submits(monkeypatch):
    """max_concurrent_requests=2, queue_size=3: of 40 simultaneous requests exactly 5 are taken while
    none can finish (prefill is held), even though admitting a request takes a while."""
    import time

    import server.engine as server_engine

    hold = threading.Event()
    real_begin, real_piece = server_engine.Engine._begin, server_engine.Engine._prefill_piece

    def slow_begin(self, request):
        time.sleep(0.05)  # a wide window between leaving the queue and prefilling
        real_begin(self, request)

    def held_piece(self, request, limit):
        hold.wait()
        real_piece(self, request, limit)

    monkeypatch.setattr(server_engine.Engine, "_begin", slow_begin)
    monkeypatch.setattr(server_engine.Engine, "_prefill_piece", held_piece)
    with ready_client(max_concurrent_requests=2, queue_size=3) as c:
        wait_ready(c)
        codes, barrier = [], threading.Barrier(40)

        def one():
            barrier.wait()
            codes.append(_generate(c, max_new_tokens=2).status_code)

        threads = [threading.Thread(target=one) for _ in range(40)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while codes.count(429) < 35 and time.time() < deadline:
            time.sleep(0.05)
        engine = c.app.state.toyllm.engine
        taken = engine.running + engine.waiting
        hold.set()  # before asserting, so that a failure does not leave threads held
        for t in threads:
            t.join(60)
        assert taken == 5
        assert sorted(set(codes)) == [200, 429] and codes.count(200) == 5


# ------------------------------------------------------------------- a live server: body limit, loop
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    log = tmp_path_factory.mktemp("live") / "server.log"
    with live_server({"TOYLLM_PRESET": "tiny", "TOYLLM_WARMUP": "false", "TOYLLM_DTYPE": "float32"}, log) as url:
        yield url


def test_a_huge_chunked_body_is_refused_at_the_limit_and_the_loop_stays_free(live):
    """20 MB sent chunked (no Content-Length): 413 without the server reading it into memory or
    parsing it, and /health answers within 100 ms all the while."""
    chunk = b"x" * 65536

    def body():
        yield b'{"prompt": "'
        for _ in range(20 * 2**20 // len(chunk)):
            yield chunk
        yield b'"}'

    health, stop = [], threading.Event()

    def probe():
        with httpx.Client(base_url=live) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                health.append(time.perf_counter() - t)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    deadline = time.monotonic() + 10
    while not health and time.monotonic() < deadline:  # the prober answers before the body starts
        time.sleep(0.01)
    started = time.perf_counter()
    r = httpx.post(live + "/generate", content=body(), headers={"content-type": "application/json"}, timeout=60)
    took = time.perf_counter() - started
    stop.set()
    prober.join()
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    assert took < 5, took
    assert health and max(health) < 0.1, max(health)
    # The connection pool and the server are fine afterwards.
    assert httpx.post(live + "/generate", json={"prompt": "ok", "max_new_tokens": 2, "stream": False},
                      timeout=120).status_code == 200


def test_a_long_prompt_is_tokenized_off_the_event_loop(live):
    """A prompt just under the body limit takes a while to tokenize (then 400: too many tokens);
    /health answers within 100 ms meanwhile."""
    prompt = "word " * 190_000
    health, stop = [], threading.Event()

    def probe():
        with httpx.Client(base_url=live) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get("/health")
                health.append(time.perf_counter() - t)
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    r = httpx.post(live + "/generate", json={"prompt": prompt, "stream": False}, timeout=60)
    stop.set()
    prober.join()
    assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"]["message"]
    assert len(health) > 3 and max(health) < 0.1, max(health)


# ------------------------------------------------------------------------------- session races
def test_cache_introspection_holds_the_session(client, monkeypatch):
    """Deterministic: while /sessions/{id}/cache reads the cache, a generation on the session gets
    409; while a generation holds the session, the introspection gets 409 (never a 500)."""
    import server.routes.sessions as routes

    r = _generate(client, max_new_tokens=3)
    sid = r.json()["session_id"]
    reading, release = threading.Event(), threading.Event()
    real = routes._kept_heads

    def slow_kept_heads(state, s):
        reading.set()
        release.wait(30)
        return real(state, s)

    monkeypatch.setattr(routes, "_kept_heads", slow_kept_heads)
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("r", client.get(f"/sessions/{sid}/cache")))
    reader.start()
    assert reading.wait(30)
    during = _generate(client, session_id=sid)
    deleted = client.delete(f"/sessions/{sid}")
    release.set()
    reader.join(30)
    assert during.status_code == 409 and deleted.status_code == 409
    assert out["r"].status_code == 200 and out["r"].json()["heads"]
    # The other way round: a request holds the session (as the engine does while it decodes).
    store = client.app.state.toyllm.store
    session = store.acquire(sid)
    try:
        r = client.get(f"/sessions/{sid}/cache")
        assert r.status_code == 409 and r.json()["error"]["type"] == "session_busy"
    finally:
        store.release(session)
    assert client.get(f"/sessions/{sid}/cache").status_code == 200
    assert _generate(client, session_id=sid).status_code == 200


def test_no_cache_configuration_a_client_sends_compiles(client):
    """Any cache configuration outside the warmed classes is refused with 422 before anything runs:
    30 distinct ones in a row compile nothing."""
    from toyllm_core import jit_stats

    _generate(client)  # whatever the first request compiles (this app skips the warm-up)
    before = jit_stats.compilations()
    for budget in range(100, 130):
        r = _generate(client, cache={"policy": "snapkv", "budget": budget})
        assert r.status_code == 422 and "cache" in r.json()["error"]["message"]
    assert _generate(client, cache={"budget": 65536}).status_code == 422
    assert jit_stats.compilations() == before
