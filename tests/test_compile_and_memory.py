"""Long decoding under a compressing policy compiles a bounded number of times and stays bounded."""

from __future__ import annotations

import numpy as np

from toyllm_core import jit_stats
from toyllm_core.generate import DecodeBatch, Row, SamplingParams, first_token, new_key, prefill
from toyllm_core.policies import CacheConfig


def _decode(model, n_tokens: int, seed: int):
    cfg = CacheConfig("snapkv", budget=64)
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0.8, top_k=40, seed=seed, ignore_eos=True)
    prompt = np.random.default_rng(seed).integers(0, 50257, 20).tolist()
    result = prefill(model, prompt, None, cfg)
    token, _, key = first_token(result.logits, params, new_key(seed))
    batch = DecodeBatch(model)
    row = batch.add(result.cache, Row(cfg, params, result.length, token, n_tokens - 1, key))
    capacities, lengths, produced = [], [], 1
    while row.active:
        produced += sum(len(out.tokens) for out in batch.step())
        capacities.append(batch.capacity)
        lengths.append(row.length)
    return produced, capacities, lengths, row


def test_300_tokens_under_snapkv_compile_boundedly_and_never_grow(model):
    before = jit_stats.compilations()
    produced, capacities, lengths, row = _decode(model, 300, seed=0)
    first_run = jit_stats.compilations() - before
    assert produced == 300
    assert first_run <= 40, f"{first_run} compilations"  # a few dozen tiny eager ops + a handful of steps
    # 20 prompt tokens fit 64 slots; the cache grows once to the bucket of budget + slack, then never.
    assert capacities[0] == 64 and max(capacities) == 128
    assert set(capacities[capacities.index(128):]) == {128}
    assert max(lengths) <= 64 + 16 and row.compressions >= 13
    # Steady state: another generation of the same shape compiles nothing.
    before = jit_stats.compilations()
    _decode(model, 300, seed=1)
    assert jit_stats.compilations() == before
