"""Shapes are closed: after warm-up nothing compiles, for any allowed cache class, any prompt length
and new or continued sessions; long decoding stays in its slots; a long prompt is admitted in chunks
between the running streams' decode calls."""

from __future__ import annotations

import numpy as np
import pytest
from server_utils import TEST_CLASSES, background_stream, metric, ready_client, wait_ready

from server.pressure import step_down
from server.sessions import Rung
from toyllm_core import jit_stats
from toyllm_core.serving.engine import CacheClass, Engine, next_piece, programs
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams


def test_300_tokens_under_snapkv_stay_in_the_slot_and_compile_once(model):
    policy = make_policy("snapkv", budget=64)
    cls = CacheClass.make(policy, 2, 64)
    params = SamplingParams(max_new_tokens=300, temperature=0.8, top_k=40, seed=0, ignore_eos=True)

    def run(seed):
        engine = Engine(model, [cls], steps_per_call=4)
        seq = engine.run_prefill(np.random.default_rng(seed).integers(0, 50257, 20), cls, params)
        produced, lengths = 1, []
        while seq.active:
            produced += sum(len(o.tokens) for o in engine.step())
            lengths.append(seq.length)
        return produced, lengths, seq, engine

    produced, lengths, seq, engine = run(0)
    assert produced == 300 and max(lengths) <= 64 + 16 and seq.compressions >= 13
    assert engine._states[cls].cache.capacity == 64 + 16  # the class's fixed geometry
    before = jit_stats.compilations()
    run(1)
    assert jit_stats.compilations() == before


def test_prefill_pieces_compress_at_the_same_tokens_whatever_the_chunk_limit():
    cls = CacheClass.make(make_policy("snapkv", budget=48, slack=16), 2, 64)

    def compress_points(limit, n=300):
        length, done, points = 0, 0, []
        while done < n:
            piece = next_piece(cls, length, n - done, limit)
            if piece.compress_first:
                points.append(done)
                length = 48
            assert piece.padded in (16, 32, 64) and length + piece.padded <= cls.prefill_capacity
            length += piece.real
            done += piece.real
        return points

    assert compress_points(64) == compress_points(16) == compress_points(32) == [112, 176, 240]  # every budget + max_chunk tokens


@pytest.mark.warmup  # every class of every kind warmed (~80 s): make test-warmup
def test_no_compile_after_warm_up_for_any_class_prompt_length_or_session():
    classes = TEST_CLASSES + ["kvzip:budget=24"]  # and a class whose prompts are reconstructed (KVzip)
    with ready_client(warmup=True, max_concurrent_requests=2, max_prompt_tokens=300, max_prefill_chunk=64,
                      interleave_chunk=16, cache_classes=classes) as c:
        wait_ready(c, timeout=600)
        state = c.app.state.toyllm
        assert state.info["warmup"]["programs"] == len(programs(state.classes, state.engine.core.batch_rows))
        assert 0 < state.info["warmup"]["memory_maps"] < state.info["warmup"]["max_map_count"]
        compiled = metric(c.get("/metrics").text, "toyllm_jit_compilations_total")
        rng = np.random.default_rng(0)
        words = ["the", "of", "and", "river", "music"]

        def prompt(n):  # ~n tokens
            return " ".join(rng.choice(words, n).tolist())

        caches = [None] + [{"policy": "full"}] + [dict(_spec(text)) for text in classes[1:]]
        sids = []
        for cache in caches:
            for n in (1, 17, 64, 130, 290):
                body = {"prompt": prompt(n), "max_new_tokens": 20, "temperature": 0.7, "top_k": 5}
                if cache:
                    body["cache"] = cache
                r = c.post("/generate", json={**body, "stream": False})
                assert r.status_code == 200, r.text
                sid = r.json()["session_id"]
                sids.append(sid)
                for m in (3, 200):  # continued sessions (a full one moves up to a larger class)
                    r = c.post("/generate", json={"prompt": prompt(m), "session_id": sid, "max_new_tokens": 9,
                                                  "temperature": 0, "stream": False})
                    assert r.status_code in (200, 400), r.text  # 400: a full session past its context
        # Sessions taken down the memory-pressure ladder (compressed; compressed and demoted) go on:
        # one of each class's, at each of its prompt lengths in turn.
        for i, sid in enumerate(sids[::5] + sids[4::5]):
            session = state.store.get(sid)
            for _ in range(1 + i % 2):
                was = Rung(session.rung, session.cache, session.cold)
                assert state.store.step_down(session, was, *step_down(session, was))
            r = c.post("/generate", json={"prompt": prompt(40), "session_id": sid, "max_new_tokens": 5,
                                          "stream": False})
            assert r.status_code in (200, 400), r.text
        assert metric(c.get("/metrics").text, "toyllm_jit_compilations_total") == compiled


def _spec(text: str) -> dict:
    name, _, args = text.partition(":")
    return {"policy": name, **{k: int(v) for k, v in (a.split("=") for a in args.split(",") if a)}}


def test_a_long_prompt_is_admitted_in_chunks_between_decode_calls():
    with ready_client(max_prompt_tokens=1024, max_prefill_chunk=64, interleave_chunk=16) as c:
        wait_ready(c)
        engine = c.app.state.toyllm.engine
        engine.trace = trace = []
        thread, started, result = background_stream(c, {"prompt": "Once upon a time", "max_new_tokens": 400,
                                                        "temperature": 0, "ignore_eos": True})
        assert started.wait(60)
        r = c.post("/generate", json={"prompt": " the" * 300, "max_new_tokens": 1, "stream": False})
        thread.join(120)
        assert r.status_code == 200 and result["status"] == 200
        long_request = next(e[1] for e in trace if e[0] == "prefill" and e[2] == 16)
        pieces = [i for i, e in enumerate(trace) if e[0] == "prefill" and e[1] is long_request]
        assert len(pieces) >= 300 // 16  # in interleave_chunk pieces while the stream decodes
        between = trace[pieces[0]:pieces[-1]]
        decodes = [e for e in between if e[0] == "decode" and e[1]]
        assert len(decodes) >= len(pieces) - 1  # the running stream got a decode call after every piece
        streamer = decodes[0][1][0]
        assert all(streamer in e[1] for e in decodes)
