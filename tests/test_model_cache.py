"""Cached decoding equals full recomputation; prefill chunks and batches do too."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_model

from toyllm_core import jit_stats
from toyllm_core.cache import KVCache, capacity_bucket
from toyllm_core.generate import SamplingParams, decode_teacher_forced, generate_tokens, prefill, prefill_step
from toyllm_core.policies import CacheConfig
from toyllm_core.verify import cached_vs_recomputed

FULL = CacheConfig("full")


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50257, n, dtype=np.int32)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cached_decode_equals_recomputation(n_kv_heads):
    assert cached_vs_recomputed(tiny_model(n_kv_heads), length=300) < 1e-4


def test_inference_copy_of_the_embedding_gives_the_same_logits(model):
    fast = model.for_inference()
    assert fast.unembed.shape == (model.cfg.d_model, model.cfg.vocab_size)
    assert cached_vs_recomputed(fast, length=100) < 1e-4  # batch-1 decode (the copy) vs parallel forward
    h = model.hidden(_tokens(5))
    np.testing.assert_allclose(np.asarray(fast.logits(h[-1])), np.asarray(model.logits(h[-1])), atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.logits(h)), np.asarray(model.logits(h)), atol=1e-5)


def test_prefill_chunk_against_existing_cache_equals_recomputation(model):
    tokens = _tokens(160)
    full = np.asarray(model(tokens))
    first = prefill(model, tokens[:100], None, FULL)
    assert np.abs(np.asarray(first.logits) - full[99]).max() < 1e-4
    # A 37-token chunk, padded to 64, attending to the 100 cached tokens plus itself.
    cache = first.cache.resize(capacity_bucket(100 + 64))
    chunk = np.zeros((1, 64), np.int32)
    chunk[0, :37] = tokens[100:137]
    logits, cache = prefill_step(model, chunk, np.array([37], np.int32), jax.tree.map(lambda x: x[None], cache),
                                 all_logits=True)
    assert np.abs(np.asarray(logits[0, :37]) - full[100:137]).max() < 1e-4
    assert int(cache.length[0]) == 137 and int(cache.next_pos[0]) == 137
    # Padding left no trace: the slots after the real tokens are empty.
    assert (np.asarray(cache.pos[0, :, :, 137:]) == -1).all()
    # And decoding continues correctly from there.
    more, _ = decode_teacher_forced(model, cache, tokens[None, 137:160])
    assert np.abs(np.asarray(more[0]) - full[137:160]).max() < 1e-4


def _greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def _run(model, prompts, cfgs, params):
    outs: dict[int, list[int]] = {}
    order: dict[int, int] = {}
    for g in generate_tokens(model, prompts, cfgs, params):
        order.setdefault(id(g.row), len(order))
        outs.setdefault(order[id(g.row)], []).append(g.token)
    return [outs[i] for i in range(len(prompts))]


def test_greedy_generation_equals_argmax_of_recomputation(model):
    prompt = _tokens(20, 1).tolist()
    (generated,) = _run(model, [prompt], [FULL], [_greedy(30)])
    forward = jax.jit(model.__call__)
    seq = list(prompt)
    for _ in range(30):  # recompute everything each step; padding after the sequence is causal-masked
        padded = np.zeros(64, np.int32)
        padded[: len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(padded))[len(seq) - 1])))
    assert generated == seq[20:]


def test_batched_decode_of_different_lengths_and_policies_equals_each_alone(model):
    prompts = [_tokens(n, s).tolist() for s, n in enumerate((5, 37, 90, 130))]
    cfgs = [FULL, CacheConfig("snapkv"), CacheConfig("h2o", budget=32, window_size=8), CacheConfig("streaming", budget=48)]
    params = [_greedy(n) for n in (40, 70, 25, 60)]
    together = _run(model, prompts, cfgs, params)
    for p, c, s, t in zip(prompts, cfgs, params, together, strict=True):
        (alone,) = _run(model, [p], [c], [s])
        assert alone == t


def test_decode_never_recompiles_for_new_positions_in_a_bucket(model):
    cache = KVCache.empty(model.cfg, 256, batch=2)
    decode_teacher_forced(model, cache, _tokens(8).reshape(2, 4))  # compile
    cache = KVCache.empty(model.cfg, 256, batch=2)
    before = jit_stats.compilations()
    for i in range(5):
        _, cache = decode_teacher_forced(model, cache, _tokens(8, i).reshape(2, 4))
    assert jit_stats.compilations() == before
    assert int(cache.length[0]) == 20


def test_rows_join_and_leave_between_steps_without_disturbing_the_others(model):
    from toyllm_core.generate import DecodeBatch, Row, first_token, new_key

    def start(prompt, cfg, n):
        params = _greedy(n)
        result = prefill(model, prompt, None, cfg)
        token, _, key = first_token(result.logits, params, new_key(0))
        return result.cache, Row(cfg, params, result.length, token, n - 1, key), [token]

    prompts = [_tokens(n, 10 + n).tolist() for n in (12, 50, 70, 33)]
    cfgs = [FULL, CacheConfig("snapkv", budget=32), CacheConfig("h2o", budget=40), FULL]
    lengths = [60, 50, 45, 30]
    batch = DecodeBatch(model, steps_per_call=4)
    outputs = {}
    rows = []
    for i in (0, 1, 2):
        cache, row, first = start(prompts[i], cfgs[i], lengths[i])
        rows.append(batch.add(cache, row))
        outputs[i] = first
    steps = 0
    while batch.active_rows:
        for out in batch.step():
            outputs[rows.index(out.row)].extend(out.tokens)
        steps += 1
        if steps == 3:  # a late joiner takes a free slot or grows the batch
            cache, row, first = start(prompts[3], cfgs[3], lengths[3])
            rows.append(batch.add(cache, row))
            outputs[3] = first
        for r in rows:  # finished rows leave; the batch compacts when mostly empty
            if r.slot >= 0 and not r.active:
                batch.remove(r)
    for i in range(4):
        (alone,) = _run(model, [prompts[i]], [cfgs[i]], [_greedy(lengths[i])])
        assert outputs[i] == alone, f"row {i}"
    assert batch.size == 0
