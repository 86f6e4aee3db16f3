"""The HTTP API in-process (TestClient): SSE framing, JSON, sessions, the error contract, metrics."""

from __future__ import annotations

import threading

import pytest
from server_utils import background_stream, metric, parse_sse, ready_client, wait_ready

from toyllm_core.serving.generate import generate_tokens
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def client():
    with ready_client() as c:
        wait_ready(c)
        yield c


def test_sse_stream_framing_and_done_payload(client):
    r = client.post("/generate", json={"prompt": "The history of", "max_new_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert names == ["token"] * 6 + ["done"]
    tokens = [data for name, data in events if name == "token"]
    assert [t["index"] for t in tokens] == list(range(6))
    assert all(set(t) == {"index", "id", "text", "logprob"} and t["logprob"] <= 0 for t in tokens)
    done = events[-1][1]
    assert done["session_id"] == r.headers["x-session-id"]
    assert done["generated_text"] == "".join(t["text"] for t in tokens)
    assert done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert set(done["cache"]) == {"policy", "budget", "tokens_seen", "tokens_kept", "bytes", "full_bytes",
                                  "compression_ratio", "tokens_cold", "hot_bytes", "cold_bytes", "reselections",
                                  "compressions", "tokens_evicted",
                                  "tokens_recalled"}
    assert done["cache"]["tokens_seen"] == 3 + 5  # the last token is not in the cache yet
    assert set(done["timings"]) == {"queue_s", "prefill_s", "ttft_s", "total_s", "tokens_per_s"}


def test_non_streaming_answers_the_done_object(client):
    r = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4, "temperature": 0, "stream": False})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["session_id"] == r.headers["x-session-id"] and body["usage"]["completion_tokens"] == 4
    # The same greedy request streamed gives the same text.
    streamed = parse_sse(client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4,
                                                        "temperature": 0}).text)[-1][1]
    assert streamed["generated_text"] == body["generated_text"]


def _turn(client, prompt, session_id=None, **extra):
    body = {"prompt": prompt, "max_new_tokens": 5, "temperature": 0, **extra}
    if session_id:
        body["session_id"] = session_id
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    return r.headers["x-session-id"], [d["id"] for n, d in events if n == "token"], events[-1][1]


def test_ignore_eos_generates_past_the_end_of_text_token(client):
    _, ids, _ = _turn(client, "Hello there")
    engine = client.app.state.toyllm.engine.core
    eos, engine.eos = engine.eos, ids[0]  # the token greedy decoding makes first now ends the text
    try:
        _, _, stopped = _turn(client, "Hello there")
        _, kept_going, done = _turn(client, "Hello there", ignore_eos=True)
    finally:
        engine.eos = eos
    # The end-of-text token came first: nothing to send, nothing counted.
    assert stopped["finish_reason"] == "eos" and stopped["usage"]["completion_tokens"] == 0
    assert stopped["generated_text"] == ""
    assert done["finish_reason"] == "length" and kept_going == ids


def test_the_end_of_text_token_is_neither_sent_nor_counted(client):
    """Nor counted as generated in the metrics; the session holds it and feeds it next turn."""
    state = client.app.state.toyllm
    body = {"prompt": "The history of", "max_new_tokens": 8, "temperature": 1.0, "seed": 7}
    ids = [d["id"] for n, d in parse_sse(client.post("/generate", json=body).text) if n == "token"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # the seed samples these again
    texts = [state.tokenizer.decode([i]) for i in ids[:k]]
    engine = state.engine.core
    eos, engine.eos = engine.eos, ids[k]
    try:
        counted = metric(client.get("/metrics").text, "toyllm_generation_tokens_total")
        r = client.post("/generate", json=body)
        after = metric(client.get("/metrics").text, "toyllm_generation_tokens_total")
        events = parse_sse(r.text)
        # Text held back for a stop string, then released by the end of text: in generated_text.
        held = client.post("/generate", json={**body, "stop": [texts[-1] + "QQQ"]})
        completion = client.post("/v1/completions", json={"model": "random-tiny", "prompt": "The history of",
                                                          "max_tokens": 8, "temperature": 1.0, "seed": 7,
                                                          "stop": [texts[-1] + "QQQ"], "stream": True})
        # The session keeps the end-of-text token; the next turn feeds it first.
        sid = r.headers["x-session-id"]
        session = state.store.get(sid)
        assert session.pending == ids[k] and session.tokens[-(k + 1):] == ids[:k + 1]
        _, _, nxt = _turn(client, " and", sid)
    finally:
        engine.eos = eos
    tokens = [d for n, d in events if n == "token"]
    done = events[-1][1]
    assert [n for n, _ in events] == ["token"] * k + ["done"] and [t["id"] for t in tokens] == ids[:k]
    assert all(t["text"] for t in tokens) and ids[k] not in [t["id"] for t in tokens]
    assert done["finish_reason"] == "eos" and done["usage"]["completion_tokens"] == len(tokens) == k
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + k
    assert done["generated_text"] == "".join(t["text"] for t in tokens) == "".join(texts)
    assert done["cache"]["tokens_seen"] == 3 + k  # the end-of-text token is not in the cache yet
    assert after - counted == k
    assert nxt["cache"]["tokens_seen"] == 3 + (k + 1) + 1 + 4  # it was, with the next prompt and 4 of 5
    # With the stop string: the last token's text was held back, and no token event carries it.
    held_events = parse_sse(held.text)
    held_tokens = [d for n, d in held_events if n == "token"]
    assert len(held_tokens) == held_events[-1][1]["usage"]["completion_tokens"] == k
    assert held_tokens[-1]["text"] == "" and held_events[-1][1]["generated_text"] == "".join(texts)
    # OpenAI streams send it in the last chunk, with finish_reason.
    chunks = [d for _, d in parse_sse(completion.text) if d != "[DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["text"] == texts[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(texts)


def test_multi_turn_full_equals_one_request_over_all_turns(client, model, tokenizer):
    turns = ["Once upon a time", " there was a", " and then"]
    sid, history, outs = None, [], []
    for prompt in turns:
        sid, ids, _ = _turn(client, prompt, sid, cache={"policy": "full"})
        history += tokenizer(prompt)["input_ids"] + ids
        outs.append(ids)
    # One request whose prompt is every turn's tokens (the last turn's output left out).
    prompt_ids = history[: -len(outs[-1])]
    expected = [g.token for g in generate_tokens(model, [prompt_ids], [make_policy("full")],
                                                 [SamplingParams(max_new_tokens=5, temperature=0)])]
    assert outs[-1] == expected


def test_snapkv_session_keeps_its_cache_at_the_budget(client):
    cache = {"policy": "snapkv", "budget": 24, "sink_size": 4, "window_size": 8, "slack": 8}
    sid = None
    for i in range(3):
        sid, _, done = _turn(client, " word" * 30, sid, cache=cache, max_new_tokens=1 if i == 2 else 12)
        assert done["cache"]["tokens_kept"] <= 24 + 8
    info = client.get(f"/sessions/{sid}").json()
    # Turns 2 and 3 (30 tokens: all of them the recall tail) prefilled against hot ∪ cold, then
    # re-selected: 24 hot, the rest cold.
    assert info["turns"] == 3 and info["cache"]["tokens_kept"] == 24
    assert info["cache"]["reselections"] == 2 and info["cache"]["tokens_cold"] == 30 + 12 + 30 + 12 + 30 - 24
    assert info["cache"]["tokens_seen"] == 30 + 12 + 30 + 12 + 30
    kept = client.get(f"/sessions/{sid}/cache").json()
    assert len(kept["heads"]) == 2 * 2  # layers x KV heads
    for head in kept["heads"]:
        positions = [slot["position"] for slot in head["kept"]]
        assert len(positions) == 24 and positions == sorted(positions)
        # Nothing is lost: every position seen is in exactly one tier.
        assert sorted(positions + head["cold"]) == list(range(info["cache"]["tokens_seen"]))
        assert positions[:4] == [0, 1, 2, 3]  # sinks
        assert positions[-8:] == list(range(info["cache"]["tokens_seen"] - 8, info["cache"]["tokens_seen"]))
        assert all(slot["text"] for slot in head["kept"])


def test_session_lifecycle_and_cache_gauges(client):
    def gauges():
        text = client.get("/metrics").text
        return metric(text, "toyllm_kv_cache_bytes", policy="h2o"), metric(text, "toyllm_sessions_active")

    before_bytes, before_sessions = gauges()
    r = client.post("/sessions", json={"cache": {"policy": "h2o", "budget": 32}})
    assert r.status_code == 201
    sid = r.json()["session_id"]
    assert len(sid) >= 22 and client.get(f"/sessions/{sid}").json()["cache"]["tokens_kept"] == 0
    _, _, done = _turn(client, "Some words to cache", sid)
    after_bytes, after_sessions = gauges()
    assert after_sessions == before_sessions + 1
    assert after_bytes - before_bytes == done["cache"]["bytes"] > 0
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert gauges() == (before_bytes, before_sessions)
    assert client.get(f"/sessions/{sid}").status_code == 404
    assert client.delete(f"/sessions/{sid}").status_code == 404


@pytest.mark.parametrize("body, status", [
    ({"prompt": ""}, 422),
    ({"prompt": "x", "max_new_tokens": 0}, 422),
    ({"prompt": "x", "max_new_tokens": 2049}, 422),
    ({"prompt": "x", "temperature": -1}, 422),
    ({"prompt": "x", "top_p": 0}, 422),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422),
    ({"prompt": "x", "unknown": 1}, 422),
    ({"prompt": "x", "cache": {"policy": "nope"}}, 422),
    ({"prompt": "x", "cache": {"policy": "snapkv", "budget": 8, "sink_size": 4, "window_size": 8}}, 422),
    ({"prompt": "x", "cache": {"policy": "snapkv", "budget": 65536}}, 422),  # valid, but not a warmed class
    ({"prompt": "x", "cache": {"policy": "h2o", "obs_window": 4}}, 422),  # not an h2o parameter
    ({"prompt": "x " * 300, "max_new_tokens": 300, "cache": {"policy": "full"}}, 400),  # past the 512 context
    ({"prompt": "x", "session_id": "no-such-session"}, 404),
])
def test_errors_follow_the_contract(client, body, status):
    r = client.post("/generate", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"type", "message"} and error["message"]


def test_errors_lose_nothing(client):
    sid, _, done = _turn(client, "Keep this context", cache={"policy": "full"})
    r = client.post("/generate", json={"prompt": "x " * 600, "session_id": sid, "max_new_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = client.post("/generate", json={"prompt": "x", "session_id": sid, "cache": {"policy": "snapkv"}})
    assert r.status_code == 400 and "fixed" in r.json()["error"]["message"]
    info = client.get(f"/sessions/{sid}").json()
    assert info["busy"] is False and info["cache"]["tokens_seen"] == done["cache"]["tokens_seen"]
    assert _turn(client, " more", sid)[2]["cache"]["tokens_seen"] > done["cache"]["tokens_seen"]


def test_second_request_on_a_busy_session_is_409(client):
    sid, _, _ = _turn(client, "Start")
    thread, started, result = background_stream(client, {"prompt": "go", "session_id": sid, "max_new_tokens": 300,
                                                         "temperature": 0})
    assert started.wait(60)
    r = client.post("/generate", json={"prompt": "again", "session_id": sid})
    assert r.status_code == 409 and r.json()["error"]["type"] == "session_busy"
    assert client.delete(f"/sessions/{sid}").status_code == 409
    thread.join(120)
    assert result["status"] == 200
    assert client.post("/generate", json={"prompt": "again", "session_id": sid, "max_new_tokens": 2}).status_code == 200


def test_queue_full_is_429_with_retry_after():
    with ready_client(max_concurrent_requests=1, queue_size=0) as c:
        wait_ready(c)
        started = threading.Event()

        def long_request():
            with c.stream("POST", "/generate", json={"prompt": "go", "max_new_tokens": 200}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        started.set()

        thread = threading.Thread(target=long_request)
        thread.start()
        assert started.wait(60)
        r = c.post("/generate", json={"prompt": "more"})
        thread.join(120)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "queue_full"
        assert metric(c.get("/metrics").text, "toyllm_sessions_active") == 1  # the refused one was not kept


def test_api_key_is_required_when_set():
    with ready_client(api_key="s3cret") as c:
        wait_ready(c)
        assert c.post("/generate", json={"prompt": "x"}).status_code == 401
        r = c.post("/generate", json={"prompt": "x", "max_new_tokens": 1}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        ok = c.post("/generate", json={"prompt": "x", "max_new_tokens": 1, "stream": False},
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_not_ready_is_503():
    from fastapi.testclient import TestClient
    from server_utils import tiny_settings

    from server.app import create_app

    c = TestClient(create_app(tiny_settings()))  # the lifespan never runs: nothing is loaded
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 503
    r = c.post("/generate", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"


def test_missing_checkpoint_is_reported_by_ready(tmp_path):
    with ready_client(preset=None, checkpoint=tmp_path / "missing") as c:
        for _ in range(100):
            r = c.get("/ready")
            if "failed" in r.text:
                break
        assert r.status_code == 503 and "no checkpoint" in r.json()["error"]["message"]


def test_body_size_limit_is_413(client):
    r = client.post("/generate", content=b'{"prompt": "' + b"x" * 1_100_000 + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_info_and_openapi(client):
    info = client.get("/info").json()
    assert info["model"]["name"] == "random-tiny" and set(info["policies"]) >= {"full", "streaming", "snapkv", "h2o"}
    assert info["default_cache"]["policy"] == "snapkv"
    assert info["backend"]["platform"] == "cpu" and info["backend"]["devices"]
    rss = info["peak_rss_bytes"]
    assert rss["load"] > 0 and rss["serving"] > 0 and 0 < info["rss_bytes"] <= rss["serving"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/sessions", "/sessions/{session_id}", "/sessions/{session_id}/cache",
            "/v1/completions", "/v1/models", "/health", "/ready", "/info", "/metrics"} <= set(paths)


def test_clients_cannot_name_sessions_without_a_trusted_proxy(client):
    proposed = "client-named-id-0123456789abcdef"
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "stream": False},
                    headers={"X-New-Session-ID": proposed})
    assert r.status_code == 200 and r.json()["session_id"] != proposed
    r = client.post("/sessions", headers={"X-New-Session-ID": proposed})
    assert r.status_code == 201 and r.json()["session_id"] != proposed
    assert client.get(f"/sessions/{proposed}").status_code == 404


def test_session_header_continues_and_a_trusted_proxy_may_name_new_sessions():
    with ready_client(trusted_proxy=True) as client:
        wait_ready(client)
        _proxy_names_sessions(client)


def _proxy_names_sessions(client):
    proposed = "proxy-minted-id-0123456789abcdef"
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "stream": False},
                    headers={"X-New-Session-ID": proposed})
    assert r.json()["session_id"] == proposed
    r = client.post("/generate", json={"prompt": " again", "max_new_tokens": 2, "stream": False},
                    headers={"X-Session-ID": proposed})
    assert r.status_code == 200 and r.json()["session_id"] == proposed
    assert client.get(f"/sessions/{proposed}").json()["turns"] == 2
    # A malformed or taken id is not used: the server mints its own.
    for bad in ("short", proposed):
        r = client.post("/sessions", headers={"X-New-Session-ID": bad})
        assert r.status_code == 201 and r.json()["session_id"] not in ("short", proposed)
    r = client.post("/generate", json={"prompt": "x", "session_id": proposed}, headers={"X-Session-ID": "other"})
    assert r.status_code == 400


def test_the_baseline_policies_serve_as_cache_classes():
    with ready_client(cache_classes=["full", "random:budget=32,seed=3", "knorm:budget=24"]) as c:
        wait_ready(c)
        for cache, kept in (({"policy": "random", "budget": 32, "seed": 3}, 32), ({"policy": "knorm", "budget": 24}, 24)):
            r = c.post("/generate", json={"prompt": "Once upon a time " * 20, "max_new_tokens": 8, "stream": False,
                                          "cache": cache, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["cache"]["policy"] == cache["policy"] and r.json()["cache"]["tokens_kept"] <= kept + 16
        r = c.post("/generate", json={"prompt": "x", "cache": {"policy": "random", "budget": 32, "seed": 4}})
        assert r.status_code == 422


def test_int8_server_reports_its_weights_and_generates():
    import jax
    import jax.numpy as jnp

    from toyllm_core.config import get_preset
    from toyllm_core.serving.model import ToyLLM
    plain = ToyLLM(get_preset("tiny"), jax.random.PRNGKey(0)).astype(jnp.bfloat16).for_inference().weight_bytes
    with ready_client(quant="int8", dtype="bfloat16") as c:
        wait_ready(c)
        model = c.get("/info").json()["model"]
        assert model["quant"] == "int8" and model["dtype"] == "bfloat16" and model["weight_bytes"] < plain
        r = c.post("/generate", json={"prompt": "the river", "max_new_tokens": 6, "temperature": 0, "stream": False})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
