"""KVzip: the reconstruction pass records, for every cached key, the largest attention one repeat
query gives it (checked against NumPy from first principles on layer 0), the policy keeps the
highest, and the pass is a list of warmed programs."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from conftest import tiny_model
from test_policies import _rope_np

from toyllm_core.serving.cache import kept_positions
from toyllm_core.serving.engine import CacheClass, Engine, programs
from toyllm_core.serving.policies import compress, make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.serving.signals import AttentionPeak

REPEAT = [11, 22, 33, 44, 55]  # stands for the chat-rendered "Repeat the previous context exactly."


def _layer0_peak(model, context: np.ndarray, pieces: list[np.ndarray]) -> np.ndarray:
    """[kv_heads, len(context)]: over the pieces (each run after the context alone, causally), the
    largest layer-0 attention weight a context key gets from one piece query and query head of its
    group. Layer 0's input is the embeddings, so its queries and keys need no earlier layer."""
    cfg = model.cfg
    block = jax.tree.map(lambda a: np.asarray(a)[0], model.blocks)
    n, hd, g = len(context), cfg.head_dim, cfg.group_size
    peak = np.zeros((cfg.n_kv_heads, n))
    for piece in pieces:
        tokens = np.concatenate([context, piece])
        t = len(tokens)
        x = np.asarray(model.embed, np.float64)[tokens]
        x = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * block.attn_norm.weight
        q = _rope_np((x @ block.attn.wq.T).reshape(t, cfg.n_heads, hd), np.arange(t), cfg.rope_theta)
        k = _rope_np((x @ block.attn.wk.T).reshape(t, cfg.n_kv_heads, hd), np.arange(t), cfg.rope_theta)
        for h in range(cfg.n_heads):
            s = q[n:, h] @ k[:, h // g].T / math.sqrt(hd)  # the piece's queries over every key
            s = np.where(np.arange(t)[None, :] <= np.arange(n, t)[:, None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            peak[h // g] = np.maximum(peak[h // g], p[:, :n].max(0))
    return peak


@pytest.mark.parametrize("n", [40, 150])  # one reconstruction piece, and three
def test_reconstruction_peaks_match_numpy_and_the_policy_keeps_the_highest(n):
    model = tiny_model(2)
    # Every head keeps its budget here (floor 100%), so that the choice is a per-head top-k.
    policy = make_policy("kvzip", budget=24, sink_size=2, window_size=4, cold_bits=0, floor_pct=100, max_factor=1)
    cls = CacheClass.make(policy, 1, 64, prefill_window=256)
    engine = Engine(model, [cls], repeat_prompt=REPEAT)
    context = np.random.default_rng(n).integers(0, model.cfg.vocab_size, n).astype(np.int32)
    job = engine.begin(context, cls, SamplingParams(max_new_tokens=1))
    while job.done < n:  # the prompt in, not yet compressed
        engine._run_piece(job, min(64, n - job.done), 64)
    before = np.asarray(job.cache.pos).copy()
    engine._reconstruct(job)

    # The pieces are cut off again: the cache holds the context as before.
    np.testing.assert_array_equal(np.asarray(job.cache.pos), before)
    assert int(np.asarray(job.cache.next_pos)[0]) == n and int(np.asarray(job.cache.length)[0]) == n
    # Each piece (the repeat prompt, then the next 59 tokens of the context) runs after the context alone.
    step = 64 - len(REPEAT)
    pieces = [np.concatenate([REPEAT, context[lo: lo + step]]) for lo in range(0, n, step)]
    expected = _layer0_peak(model, context, pieces)
    peak = np.asarray(job.cache.signal(AttentionPeak).peak)[0, 0, :, :n]
    np.testing.assert_allclose(peak, expected, rtol=2e-4, atol=2e-6)

    out = jax.jit(compress, static_argnums=1)(job.cache, policy)
    kept = kept_positions(out, policy.budget)[0]
    for h in range(model.cfg.n_kv_heads):
        protected = set(range(2)) | set(range(n - 4, n))
        others = [j for j in np.argsort(-expected[h], kind="stable") if j not in protected]
        want = sorted(protected | set(others[: policy.budget - len(protected)]))
        assert kept[h].tolist() == want


def test_the_budget_goes_to_the_best_keys_across_every_layer_and_head():
    """The row's budget x layers x heads slots, spread by score: each head between its floor and
    max_factor budgets, the totals exact, and a layer whose keys score higher keeps more."""
    policy = make_policy("kvzip", budget=8, sink_size=1, window_size=1)
    rng = np.random.default_rng(0)
    scores = rng.random((3, 2, 2, 40)).astype(np.float32) * np.array([0.1, 1.0, 0.5])[:, None, None, None]
    counts = np.asarray(policy.allocate(jax.numpy.asarray(scores), None, None))
    assert (counts.sum(axis=(0, 2)) == 8 * 3 * 2).all()
    assert counts.min() >= 2 and counts.max() <= 16  # floor: 20% of 8, at least sinks + window
    per_layer = counts.sum(axis=(1, 2))
    assert per_layer[1] > per_layer[2] > per_layer[0]


def test_a_compressed_prompt_is_reconstructed_first():
    """(That a kvzip class compiles nothing after its warm-up is checked through the server, in
    test_compile_and_memory.)"""
    model = tiny_model(2)
    policy = make_policy("kvzip", budget=24, cold_bits=0)
    cls = CacheClass.make(policy, 2, 64, prefill_window=256)
    assert cls.prefill_capacity == policy.kept_slots + 256 + 16 + 64  # room for one reconstruction piece
    assert {"clear", "truncate"} <= {p.kind for p in programs([cls])}
    engine = Engine(model, [cls], repeat_prompt=REPEAT)
    calls = []
    original = engine._reconstruct
    engine._reconstruct = lambda job: (calls.append(len(job.history) + job.done), original(job))
    for n in (20, 100, 200):
        tokens = np.random.default_rng(n).integers(0, model.cfg.vocab_size, n)
        seq = engine.run_prefill(tokens, cls, SamplingParams(max_new_tokens=3))
        while seq.active:
            engine.step()
        engine.free(seq)
    assert calls == [100, 200]  # a prompt within the budget is kept whole, not scored
