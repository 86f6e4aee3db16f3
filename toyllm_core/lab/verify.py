"""Proof that cached decoding equals full recomputation (`toyllm verify-cache`)."""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..serving.cache import empty_cache
from ..serving.engine.steps import teacher_forced
from ..serving.model import ToyLLM


@dataclass
class CacheCheck:
    cached_vs_recomputed: float  # max |logit difference|, both in the model's dtype
    logit_scale: float  # max |logit| of the recomputation: float32 rounding grows with it
    recomputed_vs_float64: float | None = None  # the dtype's own rounding: recomputation against float64
    cached_vs_float64: float | None = None


def cached_vs_recomputed(model: ToyLLM, length: int, seed: int = 0, tokens: np.ndarray | None = None,
                         float64: bool = False) -> CacheCheck:
    """Max |logit difference| over `length` tokens (random ones unless given): one parallel causal
    forward against token-by-token decoding through the KV cache. With `float64`, both are also
    compared with a float64 recomputation, which tells cache error from the dtype's rounding: a deep
    model amplifies float32 rounding, more on random tokens than on text."""
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, length, dtype=np.int32)
    tokens = np.asarray(tokens[:length], np.int32)[None]
    full = np.asarray(jax.jit(model.__call__)(tokens[0]), np.float64)
    cache = empty_cache(model.cfg, 1, tokens.shape[1], model.dtype)
    cached, _ = teacher_forced(model, cache, tokens)
    cached = np.asarray(cached[0], np.float64)
    check = CacheCheck(float(np.abs(cached - full).max()), float(np.abs(full).max()))
    if float64:
        with jax.enable_x64(True):
            wide = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
            exact = np.asarray(jax.jit(wide.__call__)(tokens[0]))
        check.recomputed_vs_float64 = float(np.abs(full - exact).max())
        check.cached_vs_float64 = float(np.abs(cached - exact).max())
    return check
