"""Compression policies: budgets, protected slots, and SnapKV/H2O against NumPy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model

from toyllm_core.serving.cache import KVCache, empty_cache, kept_positions
from toyllm_core.serving.engine.steps import prefill_chunk, teacher_forced
from toyllm_core.serving.generate import generate_tokens
from toyllm_core.serving.policies import compress, make_policy, policy_names
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.serving.signals import AttentionSum, RecentQueries

EVICTING = ["streaming", "snapkv", "h2o", "knorm", "random"]
CacheConfig = make_policy  # CacheConfig(name, budget=...) reads as before
compress_one = jax.jit(compress, static_argnums=1)
RECENT_QUERIES = 16  # SnapKV's default obs_window: the ring holds that many queries


def _filled_cache(model, n=150, seed=0, capacity=256) -> KVCache:
    """n tokens prefilled into a one-row cache that carries every policy's signals."""
    tokens = np.random.default_rng(seed).integers(0, 50257, n, dtype=np.int32)
    cache = empty_cache(model.cfg, 1, capacity, model.dtype, (AttentionSum.want(), RecentQueries.want(RECENT_QUERIES)))
    chunk = np.zeros((1, capacity), np.int32)
    chunk[0, :n] = tokens
    return prefill_chunk(model, cache, chunk, np.array([n], np.int32))[1]


def _host(cache: KVCache) -> KVCache:
    """A NumPy copy (jitted steps donate their input cache)."""
    return jax.tree.map(np.asarray, cache)


def test_registry_lists_the_policies():
    assert policy_names() == ["adakv", "expected", "full", "h2o", "knorm", "kvzip", "pyramidkv", "random", "snapkv",
                              "streaming"]


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("budget", [24, 40, 64])
def test_policy_keeps_exactly_budget_with_sinks_and_window(model, policy, budget):
    cache = _filled_cache(model)
    before = _host(cache)
    cfg = CacheConfig(policy, budget=budget, sink_size=4, window_size=16)
    out = compress_one(cache, cfg)  # donates `cache`: keep the NumPy copy
    cache = before
    n = 150
    assert int(out.length[0]) == budget
    pos = np.asarray(out.pos)[:, 0]
    np.testing.assert_array_equal(kept_positions(out, budget), pos[..., :budget])  # what the cache reports
    live = pos[..., :budget]
    assert (pos[..., budget:] == -1).all()
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_kv_heads):
            kept = live[layer, head]
            assert (np.diff(kept) > 0).all(), "kept slots must stay in position order"
            assert set(range(4)) <= set(kept), "sinks are never evicted"
            assert set(range(n - 16, n)) <= set(kept), "the recent window is never evicted"
            # Each kept slot carries the key, value and accumulated score of its original position.
            for get in (lambda c: c.k, lambda c: c.v, lambda c: c.signal(AttentionSum).score):
                got = np.asarray(get(out))[layer, 0, head, :budget]
                np.testing.assert_array_equal(got, np.asarray(get(cache))[layer, 0, head, kept])


def test_streaming_keeps_sinks_and_most_recent(model):
    out = compress_one(_filled_cache(model), CacheConfig("streaming", budget=40, sink_size=4))
    expected = list(range(4)) + list(range(150 - 36, 150))
    assert (np.asarray(out.pos)[..., :40] == np.array(expected)).all()


# --------------------------------------------------------------------------- SnapKV reference
def snapkv_reference(k, pos, length, recent_q, recent_pos, next_pos, cfg: CacheConfig):
    """SnapKV from the paper, in plain NumPy, for one layer: k [kv, S, d], recent_q [heads, R, d].
    Returns the kept original positions per KV head."""
    n_kv, _, d = k.shape
    group = recent_q.shape[0] // n_kv
    kept = []
    for h in range(n_kv):
        votes = np.zeros(length)
        for r in range(len(recent_pos)):
            qp = recent_pos[r]
            if qp < 0 or qp < next_pos - cfg.obs_window:
                continue
            for g in range(group):
                q = recent_q[h * group + g, r]
                visible = [j for j in range(length) if pos[h, j] <= qp]
                logits = np.array([q @ k[h, j] / math.sqrt(d) for j in visible])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                for j, pj in zip(visible, p, strict=True):
                    votes[j] += pj
        sinks = list(range(cfg.sink_size))
        window = list(range(length - cfg.window_size, length))
        candidates = [j for j in range(length) if j not in sinks and j not in window]
        cand_votes = np.zeros(length)
        cand_votes[candidates] = votes[candidates]
        half = cfg.pool_kernel // 2
        pooled = np.array([cand_votes[max(0, j - half) : j + half + 1].max() for j in range(length)])
        n_heavy = cfg.budget - len(sinks) - len(window)
        order = sorted(candidates, key=lambda j: (-pooled[j], j))  # ties: earlier position first
        slots = sorted(sinks + window + order[:n_heavy])
        kept.append([int(pos[h, j]) for j in slots])
    return kept


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("budget", [28, 44])
def test_snapkv_matches_numpy_reference_on_random_inputs(n_kv_heads, budget):
    rng = np.random.default_rng(budget + n_kv_heads)
    n_layers, heads, d, cap, length = 2, 4, 8, 128, 100
    # A cache that was compressed before: positions increase with gaps, but the recent window
    # (never evicted) is whole.
    pos = np.sort(rng.choice(np.arange(4, 380), length - 4 - 16, replace=False))
    pos = np.concatenate([np.arange(4), pos, np.arange(380, 396)])
    next_pos = int(pos[-1]) + 1
    recent_pos = np.full(RECENT_QUERIES, -1, np.int32)
    for p in range(next_pos - RECENT_QUERIES, next_pos):  # the ring holds the last obs_window queries
        recent_pos[p % RECENT_QUERIES] = p
    k = rng.normal(size=(n_layers, n_kv_heads, cap, d)).astype(np.float32) * 2
    recent_q = rng.normal(size=(n_layers, heads, RECENT_QUERIES, d)).astype(np.float32) * 2
    pos_all = np.tile(np.concatenate([pos, np.full(cap - length, -1)]).astype(np.int32), (n_layers, n_kv_heads, 1))
    cache = KVCache(k=jnp.asarray(k[:, None]), v=jnp.asarray(k[:, None]), pos=jnp.asarray(pos_all[:, None]),
                    length=jnp.array([length], jnp.int32), next_pos=jnp.array([next_pos], jnp.int32),
                    signals=(RecentQueries(jnp.asarray(recent_q[:, None]), jnp.asarray(recent_pos[None])),))
    cfg = CacheConfig("snapkv", budget=budget)
    out = compress_one(cache, cfg)
    got = np.asarray(out.pos)[:, 0, :, :budget]
    for layer in range(n_layers):
        expected = snapkv_reference(k[layer], pos_all[layer], length, recent_q[layer], recent_pos, next_pos, cfg)
        for h in range(n_kv_heads):
            assert got[layer, h].tolist() == expected[h]
    if n_kv_heads == 2:  # per-KV-head selection: the two heads of a layer choose differently
        assert got[0, 0].tolist() != got[0, 1].tolist()


# ----------------------------------------------------- query-agnostic baselines: key norm, random
def _random_cache(rng, n_layers=2, n_kv=2, cap=96, length=80, d=8) -> tuple[KVCache, np.ndarray]:
    """A one-row cache of random keys at increasing positions with gaps (as after compressions), the
    last 16 (the recent window, never evicted) whole."""
    middle = np.sort(rng.choice(np.arange(4, 284), length - 4 - 16, replace=False))
    pos = np.concatenate([np.arange(4), middle, np.arange(284, 300)])
    pos_all = np.tile(np.concatenate([pos, np.full(cap - length, -1)]).astype(np.int32), (n_layers, n_kv, 1))
    k = (rng.normal(size=(n_layers, n_kv, cap, d)) * rng.uniform(0.2, 3, size=(n_layers, n_kv, cap, 1)))
    cache = KVCache(k=jnp.asarray(k[:, None], jnp.float32), v=jnp.asarray(k[:, None], jnp.float32),
                    pos=jnp.asarray(pos_all[:, None]), length=jnp.array([length], jnp.int32),
                    next_pos=jnp.array([int(pos[-1]) + 1], jnp.int32))
    return cache, k


def _kept_by_scores(scores, pos, length, cfg) -> list[int]:
    """Sinks + window + the best-scored rest (ties: earlier slot), as original positions, in order."""
    protected = set(range(cfg.sink_size)) | set(range(length - cfg.window_size, length))
    rest = sorted((j for j in range(length) if j not in protected), key=lambda j: (-scores[j], j))
    slots = sorted(protected | set(rest[: cfg.budget - len(protected)]))
    return [int(pos[j]) for j in slots]


def _murmur_np(seed, layer, head, pos) -> float:
    m = 0xFFFFFFFF
    x = ((seed * 0x9E3779B1) & m) ^ ((layer * 0x85EBCA77) & m) ^ ((head * 0xC2B2AE3D) & m) ^ (pos & m)
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    x ^= x >> 16
    return (x >> 8) / (1 << 24)


@pytest.mark.parametrize("policy", ["knorm", "random"])
@pytest.mark.parametrize("budget", [24, 50])
def test_query_agnostic_baselines_match_numpy_references(policy, budget):
    rng = np.random.default_rng(budget)
    cache, k = _random_cache(rng)
    pos, length = np.asarray(cache.pos)[:, 0], 80
    cfg = CacheConfig(policy, budget=budget, sink_size=4, window_size=8, **({"seed": 7} if policy == "random" else {}))
    got = np.asarray(compress_one(cache, cfg).pos)[:, 0, :, :budget]
    for layer in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            if policy == "knorm":  # the lowest L2 norms
                scores = -np.linalg.norm(k[layer, h, :length], axis=-1)
            else:  # the same hash of (seed, layer, head, position), in plain integers
                scores = np.array([_murmur_np(7, layer, h, int(p)) for p in pos[layer, h, :length]])
            assert got[layer, h].tolist() == _kept_by_scores(scores, pos[layer, h], length, cfg)


def test_random_eviction_depends_on_its_seed_only():
    rng = np.random.default_rng(0)
    cache, _ = _random_cache(rng)
    keep = lambda seed: np.asarray(compress_one(jax.tree.map(jnp.copy, cache),
                                                CacheConfig("random", budget=30, seed=seed)).pos)[..., :30]
    assert (keep(1) == keep(1)).all() and not (keep(1) == keep(2)).all()
    with pytest.raises(ValueError, match="seed"):
        CacheConfig("random", seed=-1)


# ----------------------------------------------------------------------------- H2O reference
def _rope_np(x, pos, theta):
    half = x.shape[-1] // 2
    inv = 1.0 / theta ** (np.arange(half) / half)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_h2o_accumulated_attention_matches_reference_and_selects_heavy_hitters():
    model = tiny_model(2)
    cfg = model.cfg
    tokens = np.random.default_rng(3).integers(0, 50257, 70, dtype=np.int32)
    cache = empty_cache(cfg, 1, 128, model.dtype, (AttentionSum.want(),))
    chunk = np.zeros((1, 64), np.int32)
    chunk[0, :40] = tokens[:40]
    _, cache = prefill_chunk(model, cache, chunk, np.array([40], np.int32))
    _, cache = teacher_forced(model, cache, tokens[None, 40:70])  # 30 decode steps

    # Layer 0 from first principles: queries/keys from the embeddings, attention, column sums.
    block = jax.tree.map(lambda a: np.asarray(a)[0], model.blocks)  # layer 0 of the stacked weights
    x = np.asarray(model.embed)[tokens]
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * block.attn_norm.weight
    t, hd, g = len(tokens), cfg.head_dim, cfg.group_size
    q = _rope_np((x @ block.attn.wq.T).reshape(t, cfg.n_heads, hd), np.arange(t), cfg.rope_theta)
    k = _rope_np((x @ block.attn.wk.T).reshape(t, cfg.n_kv_heads, hd), np.arange(t), cfg.rope_theta)
    expected = np.zeros((cfg.n_kv_heads, t))
    for h in range(cfg.n_heads):
        s = q[:, h] @ k[:, h // g].T / math.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        expected[h // g] += (p / p.sum(-1, keepdims=True)).sum(0)
    np.testing.assert_allclose(np.asarray(cache.signal(AttentionSum).score)[0, 0, :, :t], expected, rtol=1e-4, atol=1e-4)

    budget = 32
    score = np.asarray(cache.signal(AttentionSum).score)[:, 0]
    out = compress_one(cache, CacheConfig("h2o", budget=budget, sink_size=4, window_size=8))
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_kv_heads):
            cand = np.arange(4, t - 8)
            heavy = cand[np.argsort(-score[layer, h, cand], kind="stable")[: budget - 12]]
            expected_kept = sorted([*range(4), *heavy.tolist(), *range(t - 8, t)])
            assert np.asarray(out.pos)[layer, 0, h, :budget].tolist() == expected_kept


# --------------------------------------------------------------- budget >= length: equals full
@pytest.mark.parametrize("policy", EVICTING)
def test_every_policy_equals_full_bit_for_bit_when_budget_covers_the_sequence(model, policy):
    prompt = np.random.default_rng(5).integers(0, 50257, 30).tolist()
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)

    def run(cfg):
        return [(g.token, g.logprob) for g in generate_tokens(model, [prompt], [cfg], [params])]

    assert run(CacheConfig(policy, budget=100)) == run(CacheConfig("full"))
