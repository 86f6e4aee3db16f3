"""Perplexity of long texts streamed through a policy (the `ppl` protocol).

The text is fed `slack` tokens at a time, and the cache compresses whenever it holds
`kept_slots + slack` tokens: what token-by-token decoding does when it compresses at budget + slack
(a chunk's tokens attend to the cache and, causally, to each other, exactly as the same tokens
decoded one by one), but with `slack` tokens per weight read, which makes 8k-token contexts
affordable on a CPU. Every sequence of a batch runs in one jitted scan.

The full cache's perplexity is the model's plain causal forward over the whole window, which is
what streaming through a cache that never evicts computes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ...serving.cache import KVCache, empty_cache
from ...serving.model import ToyLLM
from ...serving.policies import EvictingPolicy, Policy, compress
from ..evaluate import _window_nll


def _nll(model: ToyLLM, h: jax.Array, targets: jax.Array) -> jax.Array:
    logits = model.logits(h)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@partial(jax.jit, static_argnames=("policy",))
def _stream(model: ToyLLM, cache: KVCache, inputs: jax.Array, targets: jax.Array, *, policy: EvictingPolicy):
    """inputs, targets [n, B, c]: chunk after chunk through the policy -> NLL [n, B, c]."""
    chunk = inputs.shape[2]

    def step(cache, xy):
        x, y = xy
        full = cache.length[0] + chunk > cache.capacity
        cache = jax.lax.cond(full, lambda c: compress(c, policy), lambda c: c, cache)
        h, cache = model.forward(x, cache, jnp.full(x.shape[0], chunk, jnp.int32))
        return cache, _nll(model, h, y)

    _, nll = jax.lax.scan(step, cache, (inputs, targets))
    return nll


def stream_nll(model: ToyLLM, rows: np.ndarray, policy: Policy) -> np.ndarray:
    """NLL [B, T - 1] of tokens 1.. of rows [B, T] given everything before them, through `policy`."""
    b, t = rows.shape
    if not policy.evicts:
        nll_fn = jax.jit(jax.vmap(_window_nll, in_axes=(None, 0)))
        return np.asarray(jnp.concatenate([nll_fn(model, rows[i : i + 1]) for i in range(b)]), np.float64)
    chunk = policy.slack
    n = (t - 1) // chunk
    if n * chunk != t - 1:
        raise ValueError(f"sequences of {t} tokens: {t - 1} must be a multiple of the slack ({chunk})")
    cache = empty_cache(model.cfg, b, policy.trigger, model.dtype, policy.signals)
    split = lambda x: jnp.asarray(x.reshape(b, n, chunk).transpose(1, 0, 2))
    nll = _stream(model, cache, split(rows[:, :-1]), split(rows[:, 1:]), policy=policy)
    return np.asarray(nll, np.float64).transpose(1, 0, 2).reshape(b, -1)


def block_bootstrap(nll: np.ndarray, reference: np.ndarray, block: int = 256, samples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% interval of the perplexity change (%) against `reference` (both [B, T]), resampling
    blocks of `block` consecutive tokens, paired (few long sequences: blocks, not sequences)."""
    t = nll.shape[1]
    n_blocks = t // block
    per = nll[:, : n_blocks * block].reshape(-1, block).sum(1)
    ref = reference[:, : n_blocks * block].reshape(-1, block).sum(1)
    idx = np.random.default_rng(seed).integers(0, len(per), (samples, len(per)))
    delta = 100 * (np.exp(per[idx].sum(1) / (idx.shape[1] * block)) / np.exp(ref[idx].sum(1) / (idx.shape[1] * block))
                   - 1)
    return float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))
