"""Decode benchmarks: per-token latency and cache bytes against context length, policy and batch.

Latency is measured through the same `Engine` the generator and server use (sequences started by
its one recipe, jitted multi-step decode calls, compression every `slack` steps included), after a
first run that compiles every shape.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

from ..serving.engine import CacheClass, Engine
from ..serving.model import ToyLLM
from ..serving.policies import Policy
from ..serving.sampling import SamplingParams

NO_CACHE = "none"  # the baseline: recompute the whole context for every new token


@dataclass
class DecodeLatency:
    policy: str
    budget: int | None
    batch: int
    context: int
    steps: int
    median_ms_per_step: float
    p90_ms_per_step: float
    median_ms_per_token: float
    cache_bytes_per_sequence: int
    full_cache_bytes_per_sequence: int


def _filled_engine(model: ToyLLM, cls: CacheClass, batch: int, context: int, steps: int, seed: int,
                   steps_per_call: int) -> Engine:
    """An engine with `batch` sequences of `context` random prompt tokens, each to make steps + 1 tokens."""
    rng = np.random.default_rng(seed)
    engine = Engine(model, [cls], steps_per_call=steps_per_call)
    params = SamplingParams(max_new_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.run_prefill(rng.integers(0, model.cfg.vocab_size, context), cls, params)
    return engine


def timed_steps(evicts: bool, context: int, steps: int) -> int:
    """Decode steps timed at `context`. A compressing policy times all `steps` after a prompt of `context`
    tokens. A full cache is prefilled with context - steps tokens and decodes up to `context` (so it
    stays inside the model's context); a context not longer than `steps` times half as many steps as it
    has tokens instead."""
    if evicts:
        return steps
    if context < 2:
        raise ValueError(f"context {context} is too short to time decoding under the full cache (at least 2)")
    return steps if steps < context else context // 2


def decode_latency(model: ToyLLM, policy: Policy, batch: int, context: int, steps: int = 64,
                   repeats: int = 5, steps_per_call: int = 8, seed: int = 0) -> DecodeLatency:
    """Per-step decode latency once `context` tokens are cached (a full cache holds context - steps,
    so decoding stays inside the model's context; see `timed_steps`)."""
    if steps < 1 or repeats < 1:
        raise ValueError("steps and repeats must be at least 1")
    steps = timed_steps(policy.evicts, context, steps)
    prompt_len = context - steps if not policy.evicts else context
    cls = CacheClass.make(policy, batch, 512, None if policy.evicts else context + 1)
    times = []
    kept = 0
    for rep in range(repeats + 1):  # the first run compiles
        engine = _filled_engine(model, cls, batch, prompt_len, steps, seed + rep, steps_per_call)
        seqs = [s for state in engine._states.values() for s in state.rows]
        jax.block_until_ready(engine._states[cls].cache)
        start = time.perf_counter()
        while any(s.active for s in seqs):
            engine.step()
        elapsed = time.perf_counter() - start
        kept = seqs[0].length
        if rep:
            times.append(elapsed / steps)
    times_ms = sorted(t * 1e3 for t in times)
    median = statistics.median(times_ms)
    bpt = model.kv_bytes_per_token
    return DecodeLatency(
        policy=policy.name,
        budget=policy.budget if policy.evicts else None,
        batch=batch,
        context=context,
        steps=steps,
        median_ms_per_step=median,
        p90_ms_per_step=times_ms[min(len(times_ms) - 1, int(0.9 * len(times_ms)))],
        median_ms_per_token=median / batch,
        cache_bytes_per_sequence=kept * bpt,
        full_cache_bytes_per_sequence=min(context, model.cfg.context_length) * bpt,
    )


def recompute_latency(model: ToyLLM, batch: int, context: int, repeats: int = 5, seed: int = 0) -> DecodeLatency:
    """Per-step latency without a KV cache: a full causal forward over `context` tokens per new token
    (logits for the last position only, which is all a decoder needs)."""
    if context > model.cfg.context_length:
        raise ValueError(f"no-cache recomputation needs context <= {model.cfg.context_length}")
    step = jax.jit(jax.vmap(lambda t: model.logits(model.hidden(t)[-1])))
    tokens = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, context), dtype=np.int32)
    jax.block_until_ready(step(tokens))
    n = max(3, min(64, int(2048 / context)))  # enough steps to time, few at long contexts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            out = step(tokens)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / n)
    times_ms = sorted(t * 1e3 for t in times)
    median = statistics.median(times_ms)
    return DecodeLatency(
        policy=NO_CACHE, budget=None, batch=batch, context=context, steps=n, median_ms_per_step=median,
        p90_ms_per_step=times_ms[min(len(times_ms) - 1, int(0.9 * len(times_ms)))],
        median_ms_per_token=median / batch, cache_bytes_per_sequence=0, full_cache_bytes_per_sequence=0,
    )


def supports(evicts: bool, context: int, model: ToyLLM) -> bool:
    """Contexts past the model's are only for compressing policies."""
    return evicts or context <= model.cfg.context_length


def as_dicts(results: list[DecodeLatency]) -> list[dict]:
    return [asdict(r) for r in results]

