"""Expected Attention (Devoto et al., 2025, arXiv:2510.00636, "Expected Attention: KV Cache
Compression by Estimating Attention from Future Queries Distribution"): score each key by the
attention that queries still to come are expected to pay it, without seeing them. The next queries
are modelled as a Gaussian whose mean and covariance are those of the last `obs_window` queries
(before RoPE), rotated by RoPE averaged over the next `n_future` positions. For q ~ N(mu, S) the
expected unnormalised attention of a key k is exp(mu.k / sqrt(d) + k.S.k / (2 d)); it is
normalised over the keys, summed over the query heads of the KV group and weighted by the norm of
the key's value (a key whose value is small changes the output little).

Query-agnostic: what it keeps depends on the statistics of the recent queries, not on a question
that comes later, so it suits sessions whose later turns ask about other parts of the context.
Declares the `recent_queries` signal. Parameters: `budget`, `sink_size`, `window_size`, `slack`
(see `EvictingPolicy`), `obs_window`, `n_future`.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..model import rope
from ..signals import RecentQueries, Want
from .base import EvictingPolicy, param, protected_slots
from .registry import register
from .snapkv import MAX_OBS_WINDOW


def average_rotation(x: jax.Array, start: jax.Array, n: int, theta: float) -> jax.Array:
    """Apply the mean of the RoPE rotations of positions start .. start + n - 1 to x [..., hd]
    along its last axis (rotate_half convention); start broadcasts against x's leading axes."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = (start[..., None, None].astype(jnp.float32) + jnp.arange(n, dtype=jnp.float32)[:, None]) * inv_freq
    cos, sin = jnp.cos(angles).mean(-2), jnp.sin(angles).mean(-2)  # [..., half]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@register
@dataclass(frozen=True)
class ExpectedAttention(EvictingPolicy):
    name = "expected"
    obs_window: int = param(64, "Recent queries whose statistics model the future ones.", ge=2,
                            le=MAX_OBS_WINDOW)
    n_future: int = param(512, "Future positions the RoPE rotation is averaged over.", ge=1, le=65536)

    def validate(self) -> "ExpectedAttention":
        super().validate()
        if not 2 <= self.obs_window <= MAX_OBS_WINDOW:
            raise ValueError(f"obs_window must be between 2 and {MAX_OBS_WINDOW}")
        if self.n_future < 1:
            raise ValueError("n_future must be >= 1")
        return self

    @property
    def signals(self) -> tuple[Want, ...]:
        return (RecentQueries.want(self.obs_window),)

    def score(self, cache: KVCache) -> jax.Array:
        return expected_attention(cache, self.n_future, cache.rope_theta, protected_slots(cache, self)[0])


def expected_attention(cache: KVCache, n_future: int, theta: float, live: jax.Array) -> jax.Array:
    """The policy's scores [layers, batch, kv, capacity] (see the module docstring)."""
    recent = cache.signal(RecentQueries)
    n_layers, batch, n_heads, _, hd = recent.q.shape
    n_kv = cache.k.shape[2]
    observing = (recent.pos >= 0).astype(jnp.float32)  # [B, R]
    count = jnp.maximum(observing.sum(-1), 1.0)[:, None, None]  # [B, 1, 1]
    # Queries back to their unrotated form: RoPE at minus their position.
    q_pos = jnp.where(recent.pos >= 0, recent.pos, 0)
    unrotate = jax.vmap(lambda q: rope(q.transpose(0, 2, 1, 3), -q_pos, theta).transpose(0, 2, 1, 3))
    q = unrotate(recent.q) * observing[None, :, None, :, None]  # [L, B, H, R, hd]
    mean = q.sum(3) / count  # [L, B, H, hd]
    centred = (q - mean[:, :, :, None]) * observing[None, :, None, :, None]
    cov = jnp.einsum("lbhrd,lbhre->lbhde", centred, centred) / count[None, ..., None]
    start = cache.next_pos[None, :, None]  # future positions next_pos ..
    mean = average_rotation(mean, start, n_future, theta)
    cov = average_rotation(average_rotation(cov, start[..., None], n_future, theta).swapaxes(-1, -2),
                           start[..., None], n_future, theta)
    group = n_heads // n_kv
    mean = mean.reshape(n_layers, batch, n_kv, group, hd)
    cov = cov.reshape(n_layers, batch, n_kv, group, hd, hd)

    def layer(args):
        index, mu, sigma, alive = args  # layer, [B, kv, g, hd], [B, kv, g, hd, hd], [B, kv, C]
        k, v, _ = cache.layer(index)  # [B, kv, C, hd] x2, in their dtype
        k = k.astype(jnp.float32)
        logit = jnp.einsum("bkgd,bkcd->bkgc", mu, k) / math.sqrt(hd)
        spread = jnp.einsum("bkcd,bkgde,bkce->bkgc", k, sigma, k) / (2 * hd)
        expected = jax.nn.softmax(jnp.where(alive[:, :, None], logit + spread, -jnp.inf), axis=-1)
        v_norm = jnp.linalg.norm(v.astype(jnp.float32), axis=-1)  # [B, kv, C]
        return expected.sum(2) * v_norm

    return jax.lax.map(layer, (jnp.arange(n_layers), mean, cov, live))
