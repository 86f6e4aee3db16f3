"""One prompt, one answer, every policy: the runner of `passkey` and `niah`.

A prompt is prefilled once, with a full cache that records every signal a policy may ask for. Each
policy then compresses its own copy, exactly as the engine compresses a prompt whose prefill window
covers it (`CacheClass.make(..., prefill_window=...)`): once, after the last prompt token, from the
same keys, values and signals. The first answer token comes from the prefill's logits (it precedes
any compression, so every policy shares it); the rest are decoded greedily from each compressed
cache, the rows of one cache size in one batch. So the prefill, the dominant cost at 8k tokens, is
paid once per prompt instead of once per (policy, budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ...serving.cache import KVCache, empty_cache
from ...serving.engine import steps
from ...serving.model import ToyLLM
from ...serving.policies import Policy, compress
from ...serving.policies.snapkv import MAX_OBS_WINDOW
from ...serving.signals import AttentionPeak, AttentionSum, RecentQueries

# Every signal a policy here may ask for, recorded once per prompt.
EVERY_SIGNAL = (AttentionPeak.want(), AttentionSum.want(), RecentQueries.want(MAX_OBS_WINDOW))

PREFILL_CHUNK = 512
ANSWER_ROOM = 32  # decode slots past the kept ones: the answer must fit (as a policy's slack would)


@partial(jax.jit, static_argnames=("capacity",))
def _grow(cache: KVCache, *, capacity: int) -> KVCache:
    return cache.resized(capacity)


def prefill(model: ToyLLM, tokens: np.ndarray) -> tuple[jax.Array, KVCache]:
    """Prefill one prompt [T] into a full cache recording every signal (attention scores and the
    last MAX_OBS_WINDOW queries) -> (logits after the last token, cache).

    Chunk i attends over a cache of (i + 1) x PREFILL_CHUNK (+ slack) slots, grown between chunks,
    rather than over the whole prompt's: half the attention work of a long prompt (the other half is
    the causal mask). One compile per chunk index, shared by every prompt length."""
    cache = empty_cache(model.cfg, 1, PREFILL_CHUNK + ANSWER_ROOM, model.dtype, EVERY_SIGNAL)
    logits = None
    for i, lo in enumerate(range(0, len(tokens), PREFILL_CHUNK)):
        piece = tokens[lo : lo + PREFILL_CHUNK]
        chunk = np.zeros((1, PREFILL_CHUNK), np.int32)
        chunk[0, : len(piece)] = piece
        if i:
            cache = _grow(cache, capacity=(i + 1) * PREFILL_CHUNK + ANSWER_ROOM)
        logits, cache = steps.prefill_chunk(model, cache, chunk, np.array([len(piece)], np.int32))
    return logits, cache


@partial(jax.jit, static_argnames=("policy", "capacity", "squeeze"))
def compressed_copy(cache: KVCache, *, policy: Policy, capacity: int, squeeze: bool = True) -> KVCache:
    """The cache `policy` would keep after this prompt, at `capacity` slots, without signals. The
    engine compresses a prompt only when it is longer than the budget (`squeeze`)."""
    if policy.evicts and squeeze:
        cache = compress(cache.with_signals(policy.signals), policy)
    return cache.with_signals().resized(capacity)


@partial(jax.jit, static_argnames=("n",))
def greedy(model: ToyLLM, cache: KVCache, first: jax.Array, n: int) -> jax.Array:
    """n - 1 greedy tokens after `first` [B] for every row -> [B, n] (first included)."""
    def step(carry, _):
        cache, token = carry
        logits, cache = steps.decode_rows(model, token, jnp.ones(token.shape, bool), cache)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, nxt), nxt

    _, rest = jax.lax.scan(step, (cache, first), None, length=n - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def decode_capacity(policy: Policy, prompt_len: int) -> int:
    return policy.kept_slots + ANSWER_ROOM if policy.evicts else prompt_len + ANSWER_ROOM


def answers(model: ToyLLM, tokens: np.ndarray, policies: list[Policy], n_tokens: int) -> dict[Policy, list[int]]:
    """The greedy answer (n_tokens tokens) to one prompt under each policy."""
    logits, cache = prefill(model, tokens)
    first = int(jnp.argmax(logits))
    groups: dict[int, list[Policy]] = {}
    for p in policies:
        groups.setdefault(decode_capacity(p, len(tokens)), []).append(p)
    out = {}
    for capacity, group in groups.items():
        rows = KVCache.stack([compressed_copy(cache, policy=p, capacity=capacity, squeeze=p.evicts and len(tokens) > p.budget)
                                  for p in group])
        ids = np.asarray(greedy(model, rows, jnp.full(len(group), first, jnp.int32), n_tokens))
        out.update({p: ids[i].tolist() for i, p in enumerate(group)})
    return out


_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


@dataclass
class Answer:
    policy: str
    budget: int | None
    text: str
    correct: bool


def score_sample(model: ToyLLM, tokenizer, tokens: np.ndarray, answer: str, policies: list[Policy],
                 n_tokens: int) -> list[Answer]:
    """Each policy's answer to one prompt, right when its first number is `answer`."""
    out = []
    for p, ids in answers(model, tokens, policies, n_tokens).items():
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Answer(p.name, p.budget if p.evicts else None, text, first_number(text) == answer))
    return out
