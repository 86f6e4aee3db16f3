"""Idle sessions under memory pressure: a parked hot tier holds its live slots only and comes back
exactly; the ladder's steps (compressed, demoted) lose nothing but precision; the store walks idle
sessions down least recently used first, everyone compressed before anyone is demoted and dropped
last; and through the server a pressured session says where it stands and goes on."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model
from server_utils import metric, ready_client, wait_ready

from server.pressure import PressureRelief, step_down
from server.sessions import Rung, SessionStore
from toyllm_core.serving.cache import empty_cache
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.engine import steps as engine_steps
from toyllm_core.serving.parking import park, unpark
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.serving.session import Session as CoreSession
from toyllm_core.serving.tiers import ColdTier, dequantize

SNAP_CLASS = "snapkv:budget=24,sink_size=4,window_size=8,slack=8"
SNAP = {"budget": 32, "sink_size": 4, "window_size": 8, "slack": 16, "obs_window": 8, "pool_kernel": 3}


def _prefilled(model, n: int, dtype, capacity: int = 128):
    """A one-row cache (recording SnapKV's signals) after a prefill of n random tokens."""
    policy = make_policy("snapkv", **SNAP)
    cache = empty_cache(model.cfg, 1, capacity, dtype, policy.signals)
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :n] = np.random.default_rng(0).integers(0, 1000, n)
    _, cache = engine_steps.prefill_chunk(model.astype(dtype), cache, tokens, np.array([n], np.int32))
    return cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_parked_row_holds_its_live_slots_and_comes_back_exactly(dtype):
    model = tiny_model()
    cache = _prefilled(model, 40, dtype)
    row = park(cache)
    assert row.slots == 40 and row.k.shape[3] == 40
    assert row.kv_nbytes == 2 * cache.k[:, :, :, :40].nbytes  # what the hot tier is counted as
    back = unpark(row, 128)
    for name in ("k", "v"):  # the live slots exactly; past them, zeros (a padded chunk left dead keys there)
        got, want = np.asarray(getattr(back, name)), np.asarray(getattr(cache, name))
        np.testing.assert_array_equal(got[:, :, :, :40], want[:, :, :, :40])
        assert (got[:, :, :, 40:] == 0).all()
    rest = lambda c: jax.tree.leaves((c.pos, c.length, c.next_pos, c.signals))
    for a, b in zip(rest(cache), rest(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="does not fit"):
        unpark(row, 32)


@pytest.mark.parametrize("bits, tolerance", [(8, 0.01), (4, 0.12)])
def test_a_quantised_parked_row_keeps_positions_and_signals_and_rounds_keys(bits, tolerance):
    cache = _prefilled(tiny_model(), 40, jnp.float32)
    row = park(cache).quantized(bits)
    heads, hd = 2 * 2 * 40, 8  # layers x KV heads x slots; head_dim (one scale per head, or per 32 channels)
    assert row.bits == bits and row.kv_nbytes == 2 * heads * (hd * bits // 8 + 2)
    back = unpark(row, 128)
    for name in ("k", "v"):
        want, got = np.asarray(getattr(cache, name)), np.asarray(getattr(back, name))
        assert np.abs(got - want)[:, :, :, :40].max() <= tolerance * np.abs(want).max()
        assert (got[:, :, :, 40:] == 0).all()
    np.testing.assert_array_equal(np.asarray(back.pos), np.asarray(cache.pos))
    for a, b in zip(jax.tree.leaves(cache.signals), jax.tree.leaves(back.signals), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = unpark(row.quantized(bits), 128)  # the same rung twice changes nothing
    np.testing.assert_array_equal(np.asarray(again.k), np.asarray(back.k))


def test_split_cold_keeps_sinks_and_window_hot_and_moves_every_other_position_cold():
    model = tiny_model()
    cfg = model.cfg
    row = park(_prefilled(model, 50, jnp.float32))
    cold = ColdTier.empty(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 8)
    hot, cold, moved = row.split_cold(cold, sink=4, window=8)
    assert moved == 50 - 12 and hot.slots == 12 and int(hot.length[0]) == 12
    kept = sorted(range(4)) + list(range(42, 50))
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_kv_heads):
            assert hot.pos[layer, 0, head].tolist() == kept
            assert cold.pos[layer, head].tolist() == list(range(4, 42))
    # The moved keys are the originals up to int8 rounding (cold stores them quantised).
    back = cold.upload(64)
    k = np.asarray(dequantize(back.k, back.k_scale, jnp.float32))[:, 0, :, :38]
    want = row.k[:, 0, :, 4:42]
    assert np.abs(k - want).max() <= 0.01 * np.abs(want).max()


def _turn(engine, session, n, rng, new=4):
    return session.run_turn(engine, rng.integers(0, 1000, n).tolist(),
                            SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))


def _store_with(sessions, max_bytes):
    store = SessionStore(16, 900.0, max_bytes, 1)
    held = []
    for core in sessions:
        s = store.create(core.cls)
        s.cache, s.cold, s.length, s.tokens = core.cache, core.cold, core.length, core.tokens
        held.append(s)
    return store, held


def test_the_ladder_compresses_everyone_before_it_demotes_anyone_and_drops_last():
    model = tiny_model()
    tiered = CacheClass.make(make_policy("snapkv", **SNAP), 2, 64, prefill_window=128, cold_tokens=512)
    full = CacheClass.make(make_policy("full"), 2, 64, tokens=512)
    engine = Engine(model, [tiered, full])
    rng = np.random.default_rng(0)
    cores = [CoreSession(c) for c in (tiered, full, tiered)]
    for core in cores:
        _turn(engine, core, 100, rng)
    store, held = _store_with(cores, max_bytes=1)  # over budget whatever they hold
    steps = []
    relief = PressureRelief(store, on_step=lambda step, freed: steps.append((step, freed)))
    sizes = [s.bytes for s in held]
    busy = store.acquire(held[2].id)  # a request holds the third: never touched
    assert relief.relieve() == 6
    assert [s for s, _ in steps] == ["compressed", "compressed", "demoted", "demoted", "dropped", "dropped"]
    assert all(freed > 0 for _, freed in steps)
    assert store.get(busy.id) is busy and busy.rung == 0 and busy.bytes == sizes[2]
    assert len(store._sessions) == 1
    # What each step left, before the drops: replay on fresh copies.
    store, held = _store_with(cores[:2], max_bytes=1)
    for want in ("compressed", "demoted"):
        for s in held:
            before = s.bytes
            found = store.next_down()
            assert found[0] is s  # least recently used first, at the lowest rung
            hot, cold = step_down(*found)
            assert store.step_down(s, found[1], hot, cold)
            assert s.memory()["state"] == want and s.bytes < before
    tiered_s, full_s = held
    assert tiered_s.memory() == {"state": "demoted", "hot_bits": 16, "cold_bits": 4}
    assert tiered_s.cache.slots == tiered_s.length == SNAP["sink_size"] + SNAP["window_size"]
    assert tiered_s.stats()["tokens_kept"] == tiered_s.length
    assert full_s.memory() == {"state": "demoted", "hot_bits": 4, "cold_bits": None}
    assert full_s.bytes < 0.3 * sizes[1]  # float32 keys and values at int4 (head_dim 8: a scale per 8)
    assert store.next_down() is None  # everyone at the last rung: the next step drops


@pytest.mark.parametrize("rewind", [True, False])
def test_a_compressed_tiered_session_goes_on_and_loses_no_position(rewind):
    model = tiny_model()
    cls = CacheClass.make(make_policy("snapkv", **SNAP), 1, 64, prefill_window=128, cold_tokens=512)
    engine = Engine(model, [cls])
    rng = np.random.default_rng(1)
    session = CoreSession(cls)
    for turn in range(2):
        _turn(engine, session, 70, rng)
        for rung in range(2):  # compressed and demoted between turns
            session.cache, session.cold = step_down(session, Rung(rung, session.cache, session.cold))
            session.length = int(session.cache.length[0])
        if not rewind:
            session.reply_start = None  # the next turn prefills on the hot tier as it is
        hot, cold = session.cache.pos[:, 0], session.cold.pos
        for layer in range(hot.shape[0]):
            for head in range(hot.shape[1]):
                held = [p for p in hot[layer, head].tolist() + cold[layer, head].tolist() if p >= 0]
                assert sorted(held) == list(range(session.tokens_in_cache))


def test_a_step_computed_while_a_request_took_the_session_is_thrown_away():
    model = tiny_model()
    full = CacheClass.make(make_policy("full"), 1, 64, tokens=512)
    engine = Engine(model, [full])
    core = CoreSession(full)
    _turn(engine, core, 30, np.random.default_rng(0))
    store, (s,) = _store_with([core], max_bytes=1)
    session, was = store.next_down()
    hot, cold = step_down(session, was)
    store.acquire(s.id)
    assert not store.step_down(s, was, hot, cold) and s.rung == 0
    store.release(s)  # used again: back at the top of the ladder, with what the turn left
    assert s.rung == 0
    assert not store.step_down(s, Rung(0, object(), None), hot, cold)  # tiers changed meanwhile


def test_pressured_sessions_go_on_and_say_where_they_stand():
    # max_cache_bytes below one session's tiers (~17 KB): after every turn the worker walks the idle
    # sessions down.
    with ready_client(max_cache_bytes=10_000, cache_classes=["full", SNAP_CLASS]) as c:
        wait_ready(c)
        text = " ".join(["the river and the music of the hills"] * 8)
        sids = []
        for cache in ({"policy": "full"}, {"policy": "snapkv", "budget": 24, "sink_size": 4, "window_size": 8,
                                           "slack": 8}):
            r = c.post("/generate", json={"prompt": text, "max_new_tokens": 5, "cache": cache, "stream": False})
            assert r.status_code == 200, r.text
            sids.append(r.json()["session_id"])
        def states():
            found = {sid: c.get(f"/sessions/{sid}") for sid in sids}
            return {sid: r.json()["memory"] for sid, r in found.items() if r.status_code == 200}

        deadline = time.time() + 60
        while time.time() < deadline and any(m["state"] == "resident" for m in states().values()):
            time.sleep(0.05)
        held = states()
        assert held and all(m["state"] in ("compressed", "demoted") for m in held.values()), held
        page = c.get("/metrics").text
        steps = {step: metric(page, "toyllm_session_pressure_steps_total", step=step)
                 for step in ("compressed", "demoted", "dropped")}
        assert steps["compressed"] == 2 and steps["demoted"] >= 1, steps  # both compressed before a drop
        assert metric(page, "toyllm_session_pressure_freed_bytes_total", step="compressed") > 0
        assert metric(page, "toyllm_sessions_evicted_total", reason="memory") == steps["dropped"]
        for sid in held:  # a pressured session continues, and starts at the top of the ladder again
            r = c.post("/generate", json={"prompt": "and then", "session_id": sid, "max_new_tokens": 3,
                                          "stream": False})
            assert r.status_code in (200, 404), r.text  # 404: dropped meanwhile (the last step)
            if r.status_code == 200:
                assert r.json()["cache"]["tokens_seen"] > 60
