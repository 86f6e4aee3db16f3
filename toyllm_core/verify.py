"""Proof that cached decoding equals full recomputation (`toyllm verify-cache`)."""

from __future__ import annotations

import jax
import numpy as np

from .cache import empty_cache
from .engine.steps import teacher_forced
from .model import ToyLLM


def cached_vs_recomputed(model: ToyLLM, length: int, seed: int = 0) -> float:
    """Max |logit difference| over `length` random tokens: one parallel causal forward against
    token-by-token decoding through the KV cache."""
    tokens = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (1, length), dtype=np.int32)
    full = np.asarray(jax.jit(model.__call__)(tokens[0]))
    cache = empty_cache(model.cfg, 1, length, model.dtype)
    cached, _ = teacher_forced(model, cache, tokens)
    return float(np.abs(np.asarray(cached[0]) - full).max())
