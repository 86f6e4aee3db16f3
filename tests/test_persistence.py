"""Sessions that outlive the process: a session as a blob and back (token for token the same next
turn), blobs that do not verify refused whole, and through the server: 32 sessions continue after a
restart exactly as on a server that never restarted; a corrupted blob is a clear 410 and harms
nothing; memory pressure spills idle sessions to the directory and the next request loads them.
(SIGTERM writes every pending session: tests/test_shutdown.py.)"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import tiny_model
from server_utils import metric, ready_client, wait_ready

from server.pressure import step_down
from server.sessions import Rung
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.serving.session import Session
from toyllm_core.serving.snapshot import BlobError, dumps, loads

SNAP_CLASS = "snapkv:budget=24,sink_size=4,window_size=8,slack=8"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def _classes():
    return [CacheClass.make(make_policy("snapkv", budget=24, sink_size=4, window_size=8, slack=8), 2, 64,
                            prefill_window=128, cold_tokens=512),
            CacheClass.make(make_policy("full"), 2, 64, tokens=512)]


@pytest.mark.parametrize("which, pressure", [(0, 0), (1, 0), (0, 2), (1, 1)])
def test_a_session_blob_comes_back_whole_and_its_next_turn_is_the_same(which, pressure):
    model, classes = tiny_model(), _classes()
    engine = Engine(model, classes)
    rng = np.random.default_rng(0)
    session = Session(classes[which])
    session.run_turn(engine, rng.integers(0, 1000, 90).tolist(), GREEDY)
    session.chat = [{"role": "user", "content": "hi \u00e9"}, {"role": "assistant", "content": "hello"}]
    for rung in range(pressure):  # blobs of sessions down the memory-pressure ladder too
        session.cache, session.cold = step_down(session, Rung(rung, session.cache, session.cold))
        session.length = int(session.cache.length[0])
    fields, extra = loads(dumps(session, {"id": "x"}), classes)
    assert extra == {"id": "x"}
    back = Session(**fields)
    for name in ("tokens", "pending", "chat", "length", "turns", "compressions", "reply_start"):
        assert getattr(back, name) == getattr(session, name), name
    assert back.cls is session.cls and back.cache.bits == session.cache.bits
    for a, b in ((back.cache.k, session.cache.k), (back.cache.pos, session.cache.pos)):
        np.testing.assert_array_equal(a, b)
    assert (back.cold is None) == (session.cold is None)
    if session.cold is not None:
        np.testing.assert_array_equal(back.cold.k, session.cold.k)
    follow = rng.integers(0, 1000, 20).tolist()
    assert back.run_turn(engine, follow, GREEDY) == session.run_turn(engine, follow, GREEDY)


def test_a_blob_that_does_not_verify_yields_nothing():
    model, classes = tiny_model(), _classes()
    session = Session(classes[0])
    session.run_turn(Engine(model, classes), list(range(40)), GREEDY)
    blob = dumps(session)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    for bad, why in ((bytes(flipped), "checksum"), (blob[:-100], "checksum"), (b"hello", "not a session blob"),
                     (blob[:20], "not a session blob")):
        with pytest.raises(BlobError, match=why):
            loads(bad, classes)
    with pytest.raises(BlobError, match="not served here"):
        loads(blob, classes[1:])


def _turns(c, prompts, sids=None, chat=False):
    """One greedy turn per prompt (a new session each, or continuing `sids`) -> (session ids, texts)."""
    out_ids, texts = [], []
    for i, prompt in enumerate(prompts):
        body = {"prompt": prompt, "max_new_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": False}
        if sids is not None:
            body["session_id"] = sids[i]
        elif i % 2:
            body["cache"] = {"policy": "snapkv", "budget": 24, "sink_size": 4, "window_size": 8, "slack": 8}
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        out_ids.append(r.json()["session_id"])
        texts.append(r.json()["generated_text"])
    return out_ids, texts


def test_32_sessions_continue_after_a_restart_as_if_it_never_happened(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "river", "music", "of", "hills", "and", "a", "long", "road"]
    first = [" ".join(rng.choice(words, int(rng.integers(5, 60)))) for _ in range(32)]
    second = [" ".join(rng.choice(words, 12)) for _ in range(32)]
    with ready_client() as c:  # the server that never restarts (sessions in memory only)
        wait_ready(c)
        sids, _ = _turns(c, first)
        _, want = _turns(c, second, sids)
    with ready_client(session_dir=str(tmp_path)) as c:
        wait_ready(c)
        sids, _ = _turns(c, first)
    assert len(list(tmp_path.glob("*.session"))) == 32  # written before the server stopped
    with ready_client(session_dir=str(tmp_path)) as c:  # a new process would do the same: nothing is in memory
        wait_ready(c)
        assert c.app.state.toyllm.store.snapshot()["sessions"] == 0
        info = c.get(f"/sessions/{sids[1]}").json()
        assert info["turns"] == 1 and info["cache"]["policy"] == "snapkv"
        _, got = _turns(c, second, sids)
        assert got == want
        assert metric(c.get("/metrics").text, "toyllm_sessions_loaded_total") == 32
        assert c.delete(f"/sessions/{sids[0]}").status_code == 204
        assert not (tmp_path / f"{sids[0]}.session").exists()
        assert c.get(f"/sessions/{sids[0]}").status_code == 404


def test_a_corrupted_stored_session_is_lost_with_a_clear_error_and_harms_nothing(tmp_path):
    with ready_client(session_dir=str(tmp_path)) as c:
        wait_ready(c)
        (sid, other), _ = _turns(c, ["one two three", "four five six"])
    blob = tmp_path / f"{sid}.session"
    blob.write_bytes(blob.read_bytes()[:-7])  # truncated
    with ready_client(session_dir=str(tmp_path)) as c:
        wait_ready(c)
        for r in (c.get(f"/sessions/{sid}"),
                  c.post("/generate", json={"prompt": "go on", "session_id": sid, "stream": False})):
            assert r.status_code == 410, r.text
            assert r.json()["error"]["type"] == "session_lost" and "checksum" in r.json()["error"]["message"]
        assert c.app.state.toyllm.store.snapshot()["sessions"] == 0  # nothing of it was loaded
        _turns(c, ["go on"], [other])  # the server and the other session are unharmed
        assert c.get("/health").status_code == 200
        assert c.delete(f"/sessions/{sid}").status_code == 204  # a lost session can still be deleted
        assert not blob.exists() and c.get(f"/sessions/{sid}").status_code == 404


def test_memory_pressure_spills_idle_sessions_and_the_next_request_loads_them(tmp_path):
    with ready_client(session_dir=str(tmp_path), max_cache_bytes=2_000) as c:
        wait_ready(c)
        sids, _ = _turns(c, ["the river and the music of the hills"] * 4)
        deadline = time.time() + 30
        while time.time() < deadline and metric(c.get("/metrics").text, "toyllm_session_pressure_steps_total",
                                                step="spilled") < 3:
            time.sleep(0.05)
        page = c.get("/metrics").text
        assert metric(page, "toyllm_session_pressure_steps_total", step="spilled") >= 3
        assert metric(page, "toyllm_session_pressure_steps_total", step="dropped") == 0
        assert metric(page, "toyllm_sessions_evicted_total", reason="memory") == 0
        _, texts = _turns(c, ["and then"] * 4, sids)  # every one goes on: loaded from the directory
        assert len(texts) == 4 and metric(c.get("/metrics").text, "toyllm_sessions_loaded_total") >= 3



def test_stored_sessions_nobody_holds_expire_with_the_ttl(tmp_path):
    import os

    with ready_client(session_dir=str(tmp_path), session_ttl_s=60) as c:
        wait_ready(c)
        (old, kept), _ = _turns(c, ["one two three", "four five six"])
        store = c.app.state.toyllm.store
        store.persistence.flush()
        with store._lock:
            del store._sessions[old]  # as if spilled, or left by an earlier process
        stale = time.time() - 120
        os.utime(tmp_path / f"{old}.session", (stale, stale))
        os.utime(tmp_path / f"{kept}.session", (stale, stale))  # held in memory: its TTL is the store's
        store.expire()
        assert not (tmp_path / f"{old}.session").exists() and (tmp_path / f"{kept}.session").exists()


def test_ids_that_no_session_has_are_404_with_a_store(tmp_path):
    # (Found by the API fuzzer: an id with characters a file name must not carry gave 500.)
    with ready_client(session_dir=str(tmp_path)) as c:
        wait_ready(c)
        for sid in ("%F0%B0%8D%A0", "..%2Fx", "a%20b"):
            assert c.get(f"/sessions/{sid}").status_code == 404
            assert c.delete(f"/sessions/{sid}").status_code == 404
        r = c.post("/generate", json={"prompt": "0"}, headers={"X-Session-ID": ""})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
