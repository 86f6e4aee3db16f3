"""Long decoding under a compressing policy compiles a bounded number of times and stays bounded;
the shapes a decode batch compiles do not depend on when its rows joined."""

from __future__ import annotations

import numpy as np

from toyllm_core import jit_stats
from toyllm_core.generate import (
    DecodeBatch,
    Row,
    SamplingParams,
    first_token,
    new_key,
    plan_prefill,
    prefill,
    warm_prefill,
)
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
    # 20 prompt tokens fit 64 slots, but the row joins the batch at the bucket of budget + slack
    # (where it would grow before its first compression) and the batch never grows after that.
    assert set(capacities) == {128}
    assert max(lengths) <= 64 + 16 and row.compressions >= 13
    # Steady state: another generation of the same shape compiles nothing.
    before = jit_stats.compilations()
    _decode(model, 300, seed=1)
    assert jit_stats.compilations() == before


def _join(batch, model, cfg, seed: int, new_tokens: int) -> Row:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompt = np.random.default_rng(seed).integers(0, 50257, 20).tolist()
    result = prefill(model, prompt, None, cfg)
    token, _, key = first_token(result.logits, params, new_key(seed))
    return batch.add(result.cache, Row(cfg, params, result.length, token, new_tokens - 1, key))


def _drain(batch, until=lambda: False) -> None:
    while batch.active_rows and not until():
        for out in batch.step():
            if not out.row.active:
                batch.remove(out.row)


def test_rows_joining_a_grown_batch_compile_nothing_new(model):
    """The server warms up with rows that join together; under load, rows join a batch whose rows
    have already grown past their first capacity bucket. Both must compile the same shapes."""
    cfg = CacheConfig("snapkv", budget=64, slack=16)
    for size in (1, 2, 4):  # as the server's warm-up does: each batch size, rows joining together
        together = DecodeBatch(model, steps_per_call=4)
        for i in range(size):  # they leave one by one (from 4, the last one left compacts the batch to 1)
            _join(together, model, cfg, seed=i, new_tokens=90 + 8 * i)
        _drain(together)

    before = jit_stats.compilations()
    staggered = DecodeBatch(model, steps_per_call=4)
    first = _join(staggered, model, cfg, seed=10, new_tokens=120)
    _drain(staggered, until=lambda: first.length > 64)  # past the 64-slot bucket a 20-token prompt needs
    second = _join(staggered, model, cfg, seed=11, new_tokens=110)
    _drain(staggered, until=lambda: second.length > 70)
    for i in range(2):
        _join(staggered, model, cfg, seed=12 + i, new_tokens=95 + 8 * i)
    _drain(staggered)
    assert jit_stats.compilations() == before


def test_after_warm_prefill_no_prompt_on_any_session_state_compiles(model):
    """warm_prefill compiles every shape plan_prefill can reach: afterwards prompts of any length,
    on new sessions and on sessions continued from any kept length and capacity, compile nothing."""
    cfg = CacheConfig("snapkv", budget=48, sink_size=4, window_size=8, slack=16)
    assert warm_prefill(model, cfg, max_prompt=300, max_chunk=64) > 10
    before = jit_stats.compilations()
    rng = np.random.default_rng(0)
    for n in (1, 3, 17, 40, 48, 49, 64, 65, 130, 300):
        result = prefill(model, rng.integers(0, 50257, n).tolist(), None, cfg, max_chunk=64)
        for m in (1, 5, 33, 64, 100, 251):  # the session continues (its idle cache as prefill left it)
            again = prefill(model, rng.integers(0, 50257, m).tolist(), result.cache, cfg, result.length, max_chunk=64)
            assert again.length <= cfg.trigger
    # A batch leaves a session's cache trimmed to what its length needs: continue from there too.
    short = prefill(model, rng.integers(0, 50257, 5).tolist(), None, cfg, max_chunk=64)
    trimmed = short.cache.resize(128).resize(64)
    prefill(model, rng.integers(0, 50257, 70).tolist(), trimmed, cfg, short.length, max_chunk=64)
    assert jit_stats.compilations() == before


def test_plan_prefill_matches_what_prefill_does(model):
    cfg = CacheConfig("snapkv", budget=48, slack=16)
    chunks, final = plan_prefill(200, 0, None, cfg, max_chunk=64)
    # 64 tokens, then 48 kept + 64 more (128 slots), ...; every chunk leaves more than the budget.
    assert [(c.real, c.capacity, c.compress) for c in chunks] == [(64, 64, True), (64, 128, True),
                                                                  (64, 128, True), (8, 128, True)]
    assert final == 64  # the bucket of budget + slack
    result = prefill(model, list(range(200)), None, cfg, max_chunk=64)
    assert result.compressions == 4 and result.cache.capacity == final and result.length == 48
