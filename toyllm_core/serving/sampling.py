"""Token sampling inside the jitted decode step: greedy, temperature, top-k, top-p, per row.

Written for a CPU and a 50k vocabulary, where a full sort costs ~13 ms, Gumbel noise for every
token ~4 ms and `lax.top_k` inside the decode scan ~17 ms, far more than the model step itself:
- sampling draws one uniform per row and inverts the CDF blockwise (a cumulative sum over ~224
  block totals, then over one block of ~225 probabilities);
- top-k and top-p find their thresholds by bisection (each halving is one masked count or sum
  over the vocabulary), so nothing is sorted. Ties at a threshold are kept. Top-p applies to the
  distribution left after top-k, as in Hugging Face's samplers.

Which path a batch runs is chosen at run time for the whole batch (`sample_rows`, a `lax.switch`):
argmax only when no row samples, plain sampling when none filters, the filters otherwise; each row
then picks its own result (greedy rows their argmax), so rows with different settings share one
call, and one compiled program serves every mix of settings. This module also holds what a request asks of sampling (`SamplingParams`), the
per-request PRNG key, and the sampling of the first token from the prefill's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .executables import program

# Halvings of the search interval: 2^-32 of it is below float32 resolution, so thresholds are exact.
_BISECTION_STEPS = 32

# The most alternatives (the likeliest tokens and their log-probabilities) a request may ask for per
# generated token. Every compiled program returns this many columns; they are computed only in calls
# where some row asks for them (`lax.top_k` over the vocabulary costs more than a CPU decode step).
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of sampling, and when its generation ends."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    eos_id: int | None = None  # the token that ends generation instead of the model's EOS (chat: end of turn)
    top_logprobs: int = 0  # alternatives reported per token (0..TOP_LOGPROBS)

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.top_logprobs <= TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {TOP_LOGPROBS}]")
        return self

    @property
    def filtered(self) -> bool:
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


@dataclass(frozen=True)
class SamplerSpec:
    """One path of the sampler (static): random sampling at all, and the top-k/top-p filters (run
    when `sample_token`'s `filter_on` says so)."""

    sample: bool = False
    filtered: bool = False


def new_key(seed: int | None) -> np.ndarray:
    """A request's PRNG key [2] uint32 (a random one without a seed). Built on the host, as
    `jax.random.PRNGKey` lays it out, so that no device work or compile is needed."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    seed %= 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


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


def sample_token(logits, key, temperature, top_k, top_p, *, spec: SamplerSpec, filter_on=True):
    """One row: logits [vocab] -> (token, its log-probability under the unmodified model).
    `filter_on`: a scalar for the whole batch (unbatched under vmap, so it stays a branch)."""
    logz = jax.nn.logsumexp(logits)
    greedy = jnp.argmax(logits).astype(jnp.int32)
    if not spec.sample:
        return greedy, logits[greedy] - logz
    u = jax.random.uniform(key)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    probs = jnp.exp(scaled - jnp.max(scaled))
    if spec.filtered:
        probs = jax.lax.cond(filter_on, lambda p: _filter(scaled, p, top_k, top_p), lambda p: p, probs)
    token = _inverse_cdf(probs, u)
    token = jnp.where(temperature > 0, token, greedy).astype(jnp.int32)
    return token, logits[token] - logz


_PATHS = (SamplerSpec(), SamplerSpec(sample=True, filtered=True))


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Every row: logits [B, vocab], keys [B, 2] -> (tokens [B], log-probabilities [B]). What runs is
    chosen at run time for the whole batch: the bisections of the filters cost more than the model's
    step on a CPU, and sampling costs what argmax does not. The filters are a branch inside the
    sampling path rather than a path of their own, so that each decode program holds the sampling
    code once: the sampler is about half of a loaded SmolLM2 decode program's resident memory, and
    its second copy took 1.9 of the program's 12.3 MiB."""
    sampled = temperature > 0
    filtered = sampled & ((top_k > 0) | (top_p < 1))
    branches = [partial(_sample_path, spec=spec, filter_on=jnp.any(filtered)) for spec in _PATHS]
    return jax.lax.switch(jnp.any(sampled).astype(jnp.int32), branches, logits, keys, temperature, top_k, top_p)


def top_alternatives(logits, wanted) -> tuple[jax.Array, jax.Array]:
    """logits [B, vocab] -> the TOP_LOGPROBS likeliest tokens of each row [B, K] and their
    log-probabilities under the unmodified model [B, K]; zeros unless `wanted` (a scalar bool)."""
    k = min(TOP_LOGPROBS, logits.shape[-1])

    def top(logits):
        values, ids = jax.lax.top_k(logits, k)
        return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    def none(logits):
        return jnp.zeros(logits.shape[:-1] + (k,), jnp.int32), jnp.zeros(logits.shape[:-1] + (k,), jnp.float32)

    return jax.lax.cond(wanted, top, none, logits.astype(jnp.float32))


def _sample_path(logits, keys, temperature, top_k, top_p, *, spec: SamplerSpec, filter_on):
    return jax.vmap(partial(sample_token, spec=spec, filter_on=filter_on))(logits, keys, temperature, top_k, top_p)


def first_token(logits: jax.Array, sampling: SamplingParams,
                key: np.ndarray) -> tuple[int, float, list[tuple[int, float]], np.ndarray]:
    """Sample the first new token from the prefill's logits [vocab] (the decode step's sampler);
    returns (token, logprob, the `sampling.top_logprobs` likeliest alternatives as (id, logprob),
    the key to continue with)."""
    token, logprob, top_ids, top_lps, key = first_token_program(
        logits, key, np.float32(sampling.temperature), np.int32(min(sampling.top_k, logits.shape[-1])),
        np.float32(sampling.top_p), np.bool_(sampling.top_logprobs > 0))
    n = sampling.top_logprobs
    top = list(zip(np.asarray(top_ids)[:n].tolist(), np.asarray(top_lps)[:n].tolist(), strict=True))
    return int(token), float(logprob), top, np.asarray(key)


@program
def first_token_program(logits, key, temperature, top_k, top_p, want_top):
    key, sub = jax.random.split(key)
    token, logprob = sample_rows(logits[None], sub[None], temperature[None], top_k[None], top_p[None])
    top_ids, top_lps = top_alternatives(logits[None], want_top)
    return token[0], logprob[0], top_ids[0], top_lps[0], key
