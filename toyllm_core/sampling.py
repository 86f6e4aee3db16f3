"""Token sampling inside the jitted decode step: greedy, temperature, top-k, top-p, per row.

Written for a CPU and a 50k vocabulary, where a full sort costs ~13 ms, Gumbel noise for every
token ~4 ms and `lax.top_k` inside the decode scan ~17 ms, far more than the model step itself:
- sampling draws one uniform per row and inverts the CDF blockwise (a cumulative sum over ~224
  block totals, then over one block of ~225 probabilities);
- top-k and top-p find their thresholds by bisection (each halving is one masked count or sum
  over the vocabulary), so nothing is sorted. Ties at a threshold are kept. Top-p applies to the
  distribution left after top-k, as in Hugging Face's samplers.

Which of these paths a batch compiles is static (`SamplerSpec`), chosen from its rows' settings;
each row then picks its own result, so rows with different settings share one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

# Halvings of the search interval: 2^-32 of it is below float32 resolution, so thresholds are exact.
_BISECTION_STEPS = 32


@dataclass(frozen=True)
class SamplerSpec:
    """What a batch's rows need (static for jit): random sampling at all, and top-k/top-p filters."""

    sample: bool = False
    filtered: bool = False

    @staticmethod
    def for_rows(rows: list[tuple[float, int, float]]) -> SamplerSpec:
        """rows: (temperature, top_k, top_p) of each live row."""
        sampled = [(k, p) for t, k, p in rows if t > 0]
        return SamplerSpec(sample=bool(sampled), filtered=any(k > 0 or p < 1 for k, p in sampled))


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Index i with cdf(i-1) <= u * total < cdf(i), for unnormalised probs [n] (blockwise)."""
    n = probs.shape[0]
    block = max(1, int(n**0.5))
    n_blocks = -(-n // block)
    padded = jnp.pad(probs, (0, n_blocks * block - n)).reshape(n_blocks, block)
    block_cdf = jnp.cumsum(padded.sum(axis=1))
    target = u * block_cdf[-1]
    b = jnp.minimum(jnp.sum(block_cdf <= target), n_blocks - 1)
    inside = target - jnp.where(b > 0, block_cdf[b - 1], 0.0)
    cdf = jnp.cumsum(padded[b])
    j = jnp.minimum(jnp.sum(cdf <= inside), block - 1)
    # Never land on a zero-probability (filtered or padding) entry because of rounding.
    index = jnp.minimum(b * block + j, n - 1)
    return jnp.where(probs[index] > 0, index, jnp.argmax(probs))


def _bisect(measure, lo, hi, target) -> jax.Array:
    """Largest t in [lo, hi] with measure(t) >= target, for measure non-increasing in t."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        enough = measure(mid) >= target
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))
    return lo


def _filter(scaled: jax.Array, probs: jax.Array, top_k, top_p) -> jax.Array:
    """probs with everything outside the top-k, then outside the top-p nucleus, set to zero."""
    top = jnp.max(scaled)
    kth = _bisect(lambda t: jnp.sum(scaled >= t), jnp.min(scaled), top, top_k)
    probs = jnp.where((top_k <= 0) | (scaled >= kth), probs, 0.0)
    total = jnp.sum(probs)
    floor = _bisect(lambda t: jnp.sum(jnp.where(probs >= t, probs, 0.0)), jnp.float32(0.0), jnp.max(probs),
                    top_p * total)
    return jnp.where((top_p >= 1) | (probs >= floor), probs, 0.0)


def sample_token(logits, key, temperature, top_k, top_p, *, spec: SamplerSpec):
    """One row: logits [vocab] -> (token, its log-probability under the unmodified model)."""
    logz = jax.nn.logsumexp(logits)
    greedy = jnp.argmax(logits).astype(jnp.int32)
    if not spec.sample:
        return greedy, logits[greedy] - logz
    u = jax.random.uniform(key)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    probs = jnp.exp(scaled - jnp.max(scaled))
    if spec.filtered:
        probs = _filter(scaled, probs, top_k, top_p)
    token = _inverse_cdf(probs, u)
    token = jnp.where(temperature > 0, token, greedy).astype(jnp.int32)
    return token, logits[token] - logz
