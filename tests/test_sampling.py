"""Sampling: filters against a sort-based NumPy reference, inverse-CDF sampling, determinism."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyllm_core.serving.sampling import SamplerSpec, _filter, _inverse_cdf, sample_rows, sample_token


def _reference_support(logits, temperature, top_k, top_p):
    """Tokens a top-k then top-p sampler may pick (HF order), by sorting."""
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(scaled[order] - scaled[order].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize(("top_k", "top_p"), [(1, 1.0), (5, 1.0), (50, 1.0), (0, 0.5), (0, 0.9), (20, 0.8), (0, 1.0)])
def test_filter_support_matches_sort_reference(top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=1000).astype(np.float32) * 3
    scaled = jnp.asarray(logits / 0.7)
    probs = jnp.exp(scaled - scaled.max())
    kept = np.asarray(jax.jit(_filter)(scaled, probs, jnp.int32(top_k), jnp.float32(top_p)))
    assert set(np.flatnonzero(kept > 0).tolist()) == _reference_support(logits, 0.7, top_k, top_p)


def test_inverse_cdf_partitions_the_unit_interval_by_probability():
    probs = jnp.asarray(np.random.default_rng(0).random(1000).astype(np.float32) ** 4)
    us = (np.arange(20000) + 0.5) / 20000
    picks = np.asarray(jax.jit(jax.vmap(_inverse_cdf, in_axes=(None, 0)))(probs, jnp.asarray(us, jnp.float32)))
    freq = np.bincount(picks, minlength=1000) / len(us)
    expected = np.asarray(probs) / np.asarray(probs).sum()
    assert np.abs(freq - expected).max() < 2e-4  # quantisation of the u grid only


def test_greedy_and_temperature_zero_rows_take_the_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 500)).astype(np.float32))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4))
    sample = jax.jit(jax.vmap(partial(sample_token, spec=SamplerSpec(sample=True, filtered=True))))
    tokens, logprobs = sample(logits, keys, jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))
    expected = jax.nn.log_softmax(logits)[jnp.arange(4), tokens]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(expected), rtol=1e-6)


def test_sampling_is_deterministic_per_key_and_respects_top_k():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(64, 300)).astype(np.float32))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(64))
    sample = jax.jit(jax.vmap(partial(sample_token, spec=SamplerSpec(sample=True, filtered=True))))
    args = (logits, keys, jnp.ones(64), jnp.full(64, 3, jnp.int32), jnp.ones(64))
    a, _ = sample(*args)
    b, _ = sample(*args)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(int(t) in set(row) for t, row in zip(np.asarray(a), top3, strict=True))


@pytest.mark.parametrize("settings", ["all greedy", "greedy and sampled", "greedy and filtered"])
def test_one_program_serves_every_mix_of_settings_and_greedy_rows_take_the_argmax(settings):
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 300)).astype(np.float32) * 3)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4))
    temperature = jnp.array([0.0, 0.0, 0.0, 0.0] if settings == "all greedy" else [0.0, 1.0, 0.0, 1.0])
    top_k = jnp.array([0, 0, 0, 2 if settings == "greedy and filtered" else 0], jnp.int32)
    tokens, logprobs = jax.jit(sample_rows)(logits, keys, temperature, top_k, jnp.ones(4))
    greedy = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(np.asarray(tokens)[[0, 2]], greedy[[0, 2]])
    if settings == "greedy and filtered":  # the filtered row drew from its top 2
        assert int(tokens[3]) in set(np.argsort(-np.asarray(logits[3]))[:2].tolist())
    expected = jax.nn.log_softmax(logits)[jnp.arange(4), tokens]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(expected), rtol=1e-5)
