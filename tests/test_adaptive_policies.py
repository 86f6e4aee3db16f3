"""Adaptive-budget policies (AdaKV, PyramidKV) and Expected Attention against NumPy references,
their totals and protected slots, and decoding on a head-adaptive cache against recomputation."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyllm_core.serving.cache import KVCache, empty_cache
from toyllm_core.serving.engine.steps import decode_rows, prefill_chunk, teacher_forced
from toyllm_core.serving.policies import compress, make_policy
from toyllm_core.serving.policies.expected_attention import expected_attention
from toyllm_core.serving.signals import RecentQueries

pytestmark = pytest.mark.longctx

compress_one = jax.jit(compress, static_argnums=1)
score_one = jax.jit(lambda cache, policy: policy.score(cache), static_argnums=1)
expected_one = jax.jit(expected_attention, static_argnums=(1, 2))
SINK, WINDOW, RING = 4, 16, 16


# ------------------------------------------------------------------------------ random caches
def _random_cache(rng, *, n_layers=2, n_kv=2, group=2, cap=128, length=100, d=8, head_scale=None, soak=None,
                  n_observed=RING, end=380, theta=10000.0):
    """A one-row cache of random keys, values and recent queries. Positions increase with gaps (as
    after compressions); the sinks 0..3 and the last 16 positions (the recent window) are whole.
    `head_scale` [n_kv] scales each KV head's keys (concentrated or spread attention), `soak` [n_kv]
    the keys of its sinks and window again (which then draw the attention away from the candidates,
    leaving them few votes). Empty slots (position -1) hold random keys and values too: they must
    be masked, not merely zero."""
    middle = np.sort(rng.choice(np.arange(SINK, end - WINDOW), length - SINK - WINDOW, replace=False))
    pos = np.concatenate([np.arange(SINK), middle, np.arange(end - WINDOW, end)])
    pos_all = np.tile(np.concatenate([pos, np.full(cap - length, -1)]).astype(np.int32), (n_layers, n_kv, 1))
    scale = np.ones(n_kv) if head_scale is None else np.asarray(head_scale, float)
    k = rng.normal(size=(n_layers, n_kv, cap, d)) * scale[None, :, None, None]
    if soak is not None:
        protected = np.zeros(cap, bool)
        protected[:SINK] = protected[length - WINDOW: length] = True
        k[:, :, protected] *= np.asarray(soak, float)[None, :, None, None]
    k = k.astype(np.float32)
    v = (rng.normal(size=(n_layers, n_kv, cap, d)) * rng.uniform(0.2, 3, size=(n_layers, n_kv, cap, 1)))
    v = v.astype(np.float32)
    recent_q = (rng.normal(size=(n_layers, n_kv * group, RING, d)) * 2).astype(np.float32)
    recent_pos = np.full(RING, -1, np.int32)
    for p in range(end - n_observed, end):  # the ring holds the last queries, slot = pos % RING
        recent_pos[p % RING] = p
    cache = KVCache(k=jnp.asarray(k[:, None]), v=jnp.asarray(v[:, None]), pos=jnp.asarray(pos_all[:, None]),
                    length=jnp.array([length], jnp.int32), next_pos=jnp.array([end], jnp.int32),
                    signals=(RecentQueries(jnp.asarray(recent_q[:, None]), jnp.asarray(recent_pos[None])),),
                    rope_theta=theta)
    host = {"k": k, "v": v, "pos": pos_all, "recent_q": recent_q, "recent_pos": recent_pos, "next_pos": end,
            "length": length}
    return cache, host


def _host(cache: KVCache) -> KVCache:
    """A NumPy copy (jitted steps donate their input cache)."""
    return jax.tree.map(np.asarray, cache)


def _device(cache: KVCache) -> KVCache:
    return jax.tree.map(jnp.asarray, cache)


# ------------------------------------------------------------------- SnapKV votes, in NumPy
def pooled_votes_reference(k, pos, recent_q, recent_pos, next_pos, sink, window, pool_kernel):
    """SnapKV's pooled votes for one layer, in plain NumPy: k [kv, C, d], pos [kv, C], recent_q
    [heads, R, d]. Each remembered query votes with its softmax over the live keys it can see (scaled
    by 1/sqrt(d)), summed over the queries and the query heads of each KV group; only candidates
    (live, neither sink nor window) keep their votes; then max-pooling over slots (kernel
    `pool_kernel`, clipped at the ends). Returns (pooled [kv, C], live, protected)."""
    n_kv, cap, d = k.shape
    group = recent_q.shape[0] // n_kv
    k = k.astype(np.float64)
    live = pos >= 0
    protected = live & ((pos < sink) | (pos >= next_pos - window))
    votes = np.zeros((n_kv, cap))
    for h in range(n_kv):
        for g in range(group):
            for r, qp in enumerate(recent_pos):
                if qp < 0:
                    continue
                visible = live[h] & (pos[h] <= qp)
                logits = k[h, visible] @ recent_q[h * group + g, r].astype(np.float64) / math.sqrt(d)
                p = np.exp(logits - logits.max())
                votes[h, visible] += p / p.sum()
    votes = np.where(live & ~protected, votes, 0.0)
    half = pool_kernel // 2
    pooled = np.array([[votes[h, max(0, j - half): j + half + 1].max() for j in range(cap)] for h in range(n_kv)])
    return pooled, live, protected


def adakv_reference(pooled, live, protected, budget, floor, head_cap) -> list[set[int]]:
    """AdaKV's choice for one layer, from its description: each head keeps its protected slots and
    its first `floor` best (protected first, then by vote; ties by earlier slot); the layer then
    fills up to `budget x kv_heads` with the best remaining (head, slot) pairs across heads (ties:
    earlier head, earlier slot), no head above `head_cap`. Returns the kept slots per head."""
    n_kv = pooled.shape[0]
    keep = []
    for h in range(n_kv):
        order = sorted(np.flatnonzero(live[h]), key=lambda j: (not protected[h, j], -pooled[h, j], j))
        keep.append({int(j) for j in order[:floor]} | {int(j) for j in np.flatnonzero(protected[h])})
    rest = sorted(((h, int(j)) for h in range(n_kv) for j in np.flatnonzero(live[h]) if j not in keep[h]),
                  key=lambda hj: (-pooled[hj], hj[0], hj[1]))
    total = sum(len(s) for s in keep)
    for h, j in rest:
        if total == budget * n_kv:
            break
        if len(keep[h]) < head_cap:
            keep[h].add(j)
            total += 1
    return keep


def _kept(out: KVCache) -> list[list[list[int]]]:
    """Original positions of the live slots [layer][kv head], after checking that they are at the
    front of the head in increasing position order and that nothing live follows them."""
    pos = np.asarray(out.pos)[:, 0]
    result = []
    for layer in range(pos.shape[0]):
        row = []
        for h in range(pos.shape[1]):
            p = pos[layer, h]
            n = int((p >= 0).sum())
            assert (p[:n] >= 0).all() and (p[n:] == -1).all(), "kept slots must be at the front"
            assert (np.diff(p[:n]) > 0).all(), "kept slots must stay in position order"
            row.append(p[:n].tolist())
        result.append(row)
    return result


def _assert_carried(out: KVCache, before: KVCache):
    """Each kept slot carries the key and value of its original position."""
    pos_in, pos_out = np.asarray(before.pos)[:, 0], np.asarray(out.pos)[:, 0]
    for field in ("k", "v"):
        x_in, x_out = np.asarray(getattr(before, field))[:, 0], np.asarray(getattr(out, field))[:, 0]
        for layer in range(pos_in.shape[0]):
            for h in range(pos_in.shape[1]):
                n = int((pos_out[layer, h] >= 0).sum())
                slot_of = {int(p): j for j, p in enumerate(pos_in[layer, h]) if p >= 0}
                src = [slot_of[int(p)] for p in pos_out[layer, h, :n]]
                np.testing.assert_array_equal(x_out[layer, h, :n], x_in[layer, h, src])


# ------------------------------------------------------------------------- AdaKV: reference
ADAKV_CASES = [
    # n_kv, group, head_scale, soak, budget, floor_pct, max_factor
    (2, 2, [3.0, 0.3], None, 28, 20, 2),
    (4, 1, [1.0] * 4, [8, 8, 8, 1], 40, 20, 2),  # three heads look at their sinks and window: one hits the cap
    (3, 1, [0.2, 1.0, 4.0], None, 40, 60, 2),  # a floor above sinks + window, which one head is held at
    (2, 3, [2.0, 0.5], None, 32, 0, 3),
    (2, 2, [1.0, 1.0], None, 44, 20, 2),  # heads alike
]


@pytest.mark.parametrize("n_kv, group, head_scale, soak, budget, floor_pct, max_factor", ADAKV_CASES)
def test_adakv_matches_numpy_reference(n_kv, group, head_scale, soak, budget, floor_pct, max_factor):
    rng = np.random.default_rng(budget * 7 + n_kv * 3 + floor_pct)
    cache, host = _random_cache(rng, n_kv=n_kv, group=group, head_scale=head_scale, soak=soak)
    policy = make_policy("adakv", budget=budget, sink_size=SINK, window_size=WINDOW, floor_pct=floor_pct,
                         max_factor=max_factor)
    floor = max(budget * floor_pct // 100, SINK + WINDOW)
    assert policy.floor == floor and policy.kept_slots == max_factor * budget
    before = _host(cache)
    out = compress_one(cache, policy)
    got = _kept(out)
    assert int(out.length[0]) == policy.kept_slots
    all_scores = np.asarray(score_one(_device(before), policy))[:, 0]
    counts = []
    for layer in range(host["k"].shape[0]):
        pooled, live, protected = pooled_votes_reference(host["k"][layer], host["pos"][layer],
                                                         host["recent_q"][layer], host["recent_pos"],
                                                         host["next_pos"], SINK, WINDOW, policy.pool_kernel)
        # The policy's own scores are SnapKV's pooled votes on the candidates.
        scores = all_scores[layer]
        cand = live & ~protected
        np.testing.assert_allclose(scores[cand], pooled[cand], rtol=1e-4, atol=1e-7)
        expected = adakv_reference(pooled, live, protected, budget, floor, max_factor * budget)
        for h in range(n_kv):
            want = sorted(int(host["pos"][layer, h, j]) for j in expected[h])
            assert got[layer][h] == want, f"layer {layer} head {h}"
        counts.append([len(g) for g in got[layer]])
    _assert_carried(out, before)
    counts = np.array(counts)
    assert (counts.sum(axis=1) == budget * n_kv).all()
    assert (counts > budget).any(), f"the heads should share the layer's budget unevenly: {counts.tolist()}"
    if soak is not None:
        assert (counts == max_factor * budget).any(), f"a head should reach the cap: {counts.tolist()}"
    if floor > SINK + WINDOW:
        assert (counts == floor).any(), f"a head should be held at its floor: {counts.tolist()}"


def test_adakv_with_max_factor_one_is_snapkv():
    """A cap of `budget` per head leaves no room to move slots: every head keeps exactly SnapKV's."""
    rng = np.random.default_rng(11)
    cache, _ = _random_cache(rng, head_scale=[3.0, 0.3])
    before = _host(cache)
    ada = _kept(compress_one(cache, make_policy("adakv", budget=30, max_factor=1)))
    snap = _kept(compress_one(_device(before), make_policy("snapkv", budget=30)))
    assert ada == snap
    uneven = _kept(compress_one(_device(before), make_policy("adakv", budget=30, max_factor=2)))
    assert uneven != snap


# ------------------------------------------------------------------------------ AdaKV: totals
def _assert_protected(kept_positions, next_pos, sink=SINK, window=WINDOW):
    kept = set(kept_positions)
    assert set(range(sink)) <= kept, "sinks are never evicted"
    assert set(range(next_pos - window, next_pos)) <= kept, "the recent window is never evicted"


@pytest.mark.parametrize("n_kv", [2, 3])
@pytest.mark.parametrize("budget, floor_pct", [(20, 20), (36, 50), (50, 90)])
def test_adakv_totals_floor_cap_and_protected_slots(n_kv, budget, floor_pct):
    rng = np.random.default_rng(budget + n_kv)
    cache, host = _random_cache(rng, n_kv=n_kv, head_scale=rng.uniform(0.1, 4, n_kv), length=110)
    policy = make_policy("adakv", budget=budget, floor_pct=floor_pct)
    out = compress_one(cache, policy)
    got = _kept(out)
    assert int(out.length[0]) == policy.kept_slots == 2 * budget
    for layer in range(len(got)):
        counts = [len(g) for g in got[layer]]
        assert sum(counts) == budget * n_kv, counts
        assert all(policy.floor <= c <= policy.kept_slots for c in counts), counts
        for h in range(n_kv):
            assert set(got[layer][h]) <= set(host["pos"][layer, h].tolist())
            _assert_protected(got[layer][h], host["next_pos"])


def test_adakv_keeps_every_live_slot_when_the_budget_covers_them():
    rng = np.random.default_rng(5)
    cache, host = _random_cache(rng, head_scale=[3.0, 0.3], length=30)
    out = compress_one(cache, make_policy("adakv", budget=32))  # 64 slots per layer, 30 live per head
    assert int(out.length[0]) == 30
    for layer, heads in enumerate(_kept(out)):
        for h, kept in enumerate(heads):
            assert kept == host["pos"][layer, h, :30].tolist()


# ---------------------------------------------------------------------------- PyramidKV
@pytest.mark.parametrize("beta", [1, 4, 20])
def test_pyramidkv_layer_budgets(beta):
    for budget in range(20, 161, 3):
        policy = make_policy("pyramidkv", budget=budget, beta=beta)
        assert policy.last_budget == min(budget, max(budget // beta, SINK + WINDOW, 1))
        assert policy.kept_slots == 2 * budget - policy.last_budget
        assert policy.layer_budgets(1).tolist() == [budget]
        for n_layers in list(range(2, 13)) + [24, 30, 31]:
            b = policy.layer_budgets(n_layers)
            assert len(b) == n_layers
            assert int(b.sum()) == budget * n_layers, (budget, n_layers, b)
            assert (np.diff(b) <= 0).all(), (budget, n_layers, b)
            assert int(b[0]) == policy.kept_slots and int(b[-1]) == policy.last_budget, (budget, n_layers, b)
            exact = np.linspace(policy.kept_slots, policy.last_budget, n_layers)
            assert (np.abs(b - exact) < 1).all()  # rounding moves no layer by a whole slot


def test_pyramidkv_budgets_example():
    policy = make_policy("pyramidkv", budget=64, beta=20)  # last max(3, 20) = 20, first 108
    assert policy.layer_budgets(2).tolist() == [108, 20]
    assert policy.layer_budgets(3).tolist() == [108, 64, 20]
    assert policy.layer_budgets(4).tolist() == [108, 79, 49, 20]  # 78.67 -> 79, 49.33 -> 49


@pytest.mark.parametrize("n_layers, budget", [(2, 32), (3, 40), (30, 48)])
def test_pyramidkv_keeps_each_layer_budget_by_snapkv_votes(n_layers, budget):
    rng = np.random.default_rng(n_layers + budget)
    cache, host = _random_cache(rng, n_layers=n_layers, head_scale=[2.0, 0.5])
    before = _host(cache)
    policy = make_policy("pyramidkv", budget=budget)
    budgets = policy.layer_budgets(n_layers)
    out = compress_one(cache, policy)
    got = _kept(out)
    assert int(out.length[0]) == policy.kept_slots
    for layer in range(n_layers):
        pooled, live, protected = pooled_votes_reference(host["k"][layer], host["pos"][layer],
                                                         host["recent_q"][layer], host["recent_pos"],
                                                         host["next_pos"], SINK, WINDOW, policy.pool_kernel)
        for h in range(2):
            assert len(got[layer][h]) == budgets[layer]
            _assert_protected(got[layer][h], host["next_pos"])
            cand = sorted(np.flatnonzero(live[h] & ~protected[h]), key=lambda j: (-pooled[h, j], j))
            slots = list(np.flatnonzero(protected[h])) + cand[: budgets[layer] - int(protected[h].sum())]
            assert got[layer][h] == sorted(int(host["pos"][layer, h, j]) for j in slots), f"layer {layer} head {h}"
    _assert_carried(out, before)


# ------------------------------------------------------------------------ Expected Attention
def rope_matrix(p: float, d: int, theta: float) -> np.ndarray:
    """The RoPE rotation of position p as a matrix (rotate_half convention): rope(x, p) = R @ x."""
    half = d // 2
    a = p / theta ** (np.arange(half) / half)
    r = np.zeros((d, d))
    i = np.arange(half)
    r[i, i], r[i, i + half] = np.cos(a), -np.sin(a)
    r[i + half, i + half], r[i + half, i] = np.cos(a), np.sin(a)
    return r


def expected_attention_reference(host, n_future, theta) -> np.ndarray:
    """Expected Attention scores [layers, kv, C] in plain NumPy (float64)."""
    k, v, pos, recent_q, recent_pos = (host[x] for x in ("k", "v", "pos", "recent_q", "recent_pos"))
    n_layers, n_kv, cap, d = k.shape
    n_heads = recent_q.shape[1]
    group = n_heads // n_kv
    observed = [r for r in range(len(recent_pos)) if recent_pos[r] >= 0]
    r_bar = np.mean([rope_matrix(p, d, theta) for p in range(host["next_pos"], host["next_pos"] + n_future)], 0)
    live = pos >= 0
    out = np.zeros((n_layers, n_kv, cap))
    for layer in range(n_layers):
        for h in range(n_kv):
            keys = k[layer, h].astype(np.float64)
            for g in range(group):
                qs = np.array([rope_matrix(-recent_pos[r], d, theta) @ recent_q[layer, h * group + g, r]
                               for r in observed])
                mu = qs.mean(0)
                sigma = (qs - mu).T @ (qs - mu) / len(qs)
                mu, sigma = r_bar @ mu, r_bar @ sigma @ r_bar.T
                logit = keys @ mu / math.sqrt(d) + np.einsum("cd,de,ce->c", keys, sigma, keys) / (2 * d)
                logit = np.where(live[layer, h], logit, -np.inf)
                p = np.exp(logit - logit.max())
                out[layer, h] += p / p.sum()
            out[layer, h] *= np.linalg.norm(v[layer, h].astype(np.float64), axis=-1)
    return out


@pytest.mark.parametrize("n_kv, group, n_future, n_observed, theta",
                         [(2, 2, 512, RING, 10000.0), (1, 4, 7, RING, 10000.0), (2, 1, 64, 9, 500000.0)])
def test_expected_attention_matches_numpy_reference(n_kv, group, n_future, n_observed, theta):
    rng = np.random.default_rng(n_future + n_observed)
    # Keys at half scale: moderate logits (the spread term k.S.k grows with the square of the keys).
    cache, host = _random_cache(rng, n_kv=n_kv, group=group, n_observed=n_observed, theta=theta,
                                head_scale=[0.5] * n_kv)
    got = np.asarray(expected_one(cache, n_future, cache.rope_theta, cache.pos >= 0))[:, 0]
    want = expected_attention_reference(host, n_future, theta)
    assert (got[np.broadcast_to(host["pos"] < 0, got.shape)] == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    # The score does depend on the future positions (a rotation by the mean of the RoPE rotations).
    other = np.asarray(expected_one(cache, n_future + 100, theta, cache.pos >= 0))[:, 0]
    assert not np.allclose(other, got, rtol=1e-3)

    # The policy keeps the sinks, the window and the best-scored rest (ties: earlier slot).
    budget = 40
    policy = make_policy("expected", budget=budget, sink_size=SINK, window_size=WINDOW, obs_window=RING,
                         n_future=n_future)
    np.testing.assert_allclose(np.asarray(score_one(cache, policy))[:, 0], got, rtol=1e-6)
    out = compress_one(cache, policy)
    kept = _kept(out)
    assert int(out.length[0]) == budget
    length = host["length"]
    for layer in range(host["k"].shape[0]):
        for h in range(n_kv):
            scores = want[layer, h]
            rest = sorted(range(SINK, length - WINDOW), key=lambda j: (-scores[j], j))
            slots = sorted([*range(SINK), *rest[: budget - SINK - WINDOW], *range(length - WINDOW, length)])
            assert kept[layer][h] == [int(host["pos"][layer, h, j]) for j in slots], f"layer {layer} head {h}"


def test_expected_attention_breaks_ties_by_earlier_slot():
    """Candidates with the same key and value score alike; those kept are the earliest."""
    rng = np.random.default_rng(9)
    cache, host = _random_cache(rng, n_kv=1, group=2, n_layers=1, head_scale=[0.5])
    policy = make_policy("expected", budget=30, obs_window=RING, n_future=32)
    scores = np.asarray(score_one(cache, policy))[0, 0, 0]
    best = SINK + int(np.argmax(scores[SINK:100 - WINDOW]))  # the best candidate
    tied = sorted({best, *range(40, 60)})
    k, v = np.array(host["k"]), np.array(host["v"])
    k[0, 0, tied], v[0, 0, tied] = k[0, 0, best], v[0, 0, best]
    cache = eqx.tree_at(lambda c: (c.k, c.v), cache, (jnp.asarray(k[:, None]), jnp.asarray(v[:, None])))
    scores = np.asarray(score_one(cache, policy))[0, 0, 0]
    assert (scores[tied] == scores[best]).all()
    assert (scores[SINK:100 - WINDOW] <= scores[best]).all()
    kept = _kept(compress_one(cache, policy))[0][0]
    slots = [*range(SINK), *tied[:10], *range(100 - WINDOW, 100)]  # 30 - sinks - window = 10 of the tie
    assert kept == [int(host["pos"][0, 0, j]) for j in slots]


# ------------------------------------------------------------------------- several rows at once
@pytest.mark.parametrize("name", ["adakv", "pyramidkv", "expected"])
def test_rows_of_a_batch_compress_independently(name):
    """Two rows with different positions, lengths and heads compress as each would alone."""
    rng = np.random.default_rng(3)
    rows = [_random_cache(rng, n_kv=3, group=1, head_scale=[3.0, 1.0, 0.3], length=100, end=380)[0],
            _random_cache(rng, n_kv=3, group=1, head_scale=[0.3, 1.0, 3.0], length=90, end=250)[0]]
    both = KVCache.stack(rows)
    extra = {"obs_window": RING} if name == "expected" else {}
    policy = make_policy(name, budget=30, **extra)
    out = _host(compress_one(both, policy))
    for b, row in enumerate(rows):
        alone = _host(compress_one(row, policy))
        for f in ("k", "v", "pos"):
            np.testing.assert_array_equal(getattr(out, f)[:, b], getattr(alone, f)[:, 0])
        assert out.length[b] == alone.length[0]
    assert not (out.pos[:, 0] == out.pos[:, 1]).all()


# --------------------------------------------------- decoding on a head-adaptive cache, tiny model
@jax.jit
def _decode(model, cache, tokens):
    """Feed tokens [T] one decode step at a time -> logits [T, vocab] (the cache is not donated)."""

    def step(cache, token):
        logits, cache = decode_rows(model, token[None], jnp.ones(1, bool), cache)
        return cache, logits[0]

    return jax.lax.scan(step, cache, tokens)[1]


def _masked_like(full: KVCache, compressed: KVCache) -> KVCache:
    """The uncompressed cache with every slot the compressed one dropped (per layer and KV head)
    masked (position -1)."""
    pos = np.array(full.pos)
    kept = np.asarray(compressed.pos)
    for layer in range(pos.shape[0]):
        for h in range(pos.shape[2]):
            keep = set(kept[layer, 0, h][kept[layer, 0, h] >= 0].tolist())
            drop = ~np.isin(pos[layer, 0, h], list(keep))
            pos[layer, 0, h][drop] = -1
    return eqx.tree_at(lambda c: c.pos, _device(full), jnp.asarray(pos))


@pytest.mark.parametrize("name, params", [("adakv", {"budget": 32}), ("pyramidkv", {"budget": 32})])
def test_compressed_cache_decodes_like_recomputation_over_the_kept_slots(model, name, params):
    cfg = model.cfg
    assert cfg.n_kv_heads >= 2 and model.dtype == jnp.float32
    policy = make_policy(name, **params)
    n, more = 120, 20
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, n + 1 + more, dtype=np.int32)
    cache = empty_cache(cfg, 1, 256, jnp.float32, policy.signals)
    chunk = np.zeros((1, 128), np.int32)
    chunk[0, :n] = tokens[:n]
    full = _host(prefill_chunk(model, cache, chunk, np.array([n], np.int32))[1])

    small = compress_one(_device(full), policy)
    got = _kept(small)
    counts = np.array([[len(g) for g in layer] for layer in got])
    assert int(small.length[0]) == policy.kept_slots
    if name == "adakv":
        assert (counts.sum(axis=1) == 32 * cfg.n_kv_heads).all()
        assert (counts != 32).any(), f"the heads should keep different counts: {counts.tolist()}"
    else:
        assert (counts == policy.layer_budgets(cfg.n_layers)[:, None]).all()
        assert len(set(counts[:, 0].tolist())) > 1
    masked = _masked_like(full, small)

    # The next tokens, decoded on the compressed cache and on the masked full one.
    rest = jnp.asarray(tokens[n:])
    logits_small = _decode(model, _device(_host(small)), rest)
    logits_masked = _decode(model, masked, rest)
    np.testing.assert_allclose(np.asarray(logits_small), np.asarray(logits_masked), atol=1e-5)
    logits_full = _decode(model, _device(full), rest)
    assert not np.allclose(np.asarray(logits_full[0]), np.asarray(logits_small[0]), atol=1e-5), \
        "dropping slots should change the logits"

    # Decoding more, then compressing again: the totals and protected slots still hold.
    _, after = teacher_forced(model, _device(_host(small)), rest[None])
    next_pos = n + 1 + more
    assert int(after.next_pos[0]) == next_pos and int(after.length[0]) == policy.kept_slots + 1 + more
    again = compress_one(after, policy)
    assert int(again.length[0]) == policy.kept_slots
    got = _kept(again)
    for layer in range(cfg.n_layers):
        counts = [len(g) for g in got[layer]]
        if name == "adakv":
            assert sum(counts) == 32 * cfg.n_kv_heads
            assert all(policy.floor <= c <= policy.kept_slots for c in counts), counts
        else:
            assert counts == [policy.layer_budgets(cfg.n_layers)[layer]] * cfg.n_kv_heads
        for h in range(cfg.n_kv_heads):
            _assert_protected(got[layer][h], next_pos)
