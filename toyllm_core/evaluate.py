"""Perplexity against cache budget, under three protocols, batched across sequences.

- `streaming`: teacher-forced token-by-token decoding through the policy (compressing whenever the
  cache reaches budget + slack, as generation does); the NLL of every next token.
- `prefill`: prefill `context` tokens, compress once to the budget, then teacher-force the next
  `continuation` tokens; perplexity on those.
- `copy`: a random token sequence, then the same sequence again; accuracy and perplexity on the
  second copy, which the model can only get right by retrieving from the compressed cache.

Every (policy, budget) runs over the same sequences, so changes against `full` are paired: their
95% interval comes from a bootstrap over sequences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache, empty_cache
from .engine.steps import decode_rows
from .model import ToyLLM
from .policies import Policy, compress, make_policy

PROTOCOLS = ("streaming", "prefill", "copy")


@dataclass
class CorpusPerplexity:
    tokens: int
    words: int
    nll: float  # summed over every token but the first
    token_perplexity: float
    word_perplexity: float  # exp(total NLL / whitespace words): comparable across tokenizers


def corpus_perplexity(model: ToyLLM, tokens: np.ndarray, words: int, seq_len: int = 1024,
                      batch: int = 4) -> CorpusPerplexity:
    """Full-cache perplexity of a whole token stream with strided windows: each window of seq_len
    tokens scores only its second half (the first window scores everything), so every token but the
    first is scored once, with at least seq_len / 2 tokens of context where the text allows."""
    stride = seq_len // 2
    nll_fn = jax.jit(jax.vmap(_window_nll, in_axes=(None, 0)))
    starts = list(range(0, max(len(tokens) - seq_len, 0) + 1, stride))
    if starts[-1] + seq_len < len(tokens):
        starts.append(len(tokens) - seq_len)
    total, scored, covered = 0.0, 0, 1  # covered: tokens [0, covered) already scored or skipped
    for lo in range(0, len(starts), batch):
        group = starts[lo : lo + batch]
        windows_ = np.stack([_window(tokens, s, seq_len) for s in group + [group[0]] * (batch - len(group))])
        nll = np.asarray(nll_fn(model, windows_), np.float64)  # [batch, seq_len - 1]; nll[i, j] is token s + j + 1
        for i, start in enumerate(group):
            first = max(covered, start + 1)
            end = min(start + seq_len, len(tokens))
            total += nll[i, first - start - 1 : end - start - 1].sum()
            scored += end - first
            covered = end
    return CorpusPerplexity(len(tokens), words, total, float(np.exp(total / scored)), float(np.exp(total / words)))


def _window(tokens: np.ndarray, start: int, length: int) -> np.ndarray:
    w = tokens[start : start + length]
    return np.pad(w, (0, length - len(w)))  # only the last window of a short text is padded


# Positions per block of logits when scoring a window: [128, vocab] floats (~25 MB for GPT-2's
# vocabulary) at a time instead of [seq_len, vocab] (~200 MB per 1024-token window, times the batch).
NLL_BLOCK = 128


def _window_nll(model: ToyLLM, window):
    """NLL of tokens 1.. of a window [T] given the ones before -> [T - 1]."""
    h = model.hidden(window)[:-1]
    targets = window[1:]
    t = h.shape[0]
    pad = -t % NLL_BLOCK
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, NLL_BLOCK, h.shape[-1])
    targets = jnp.pad(targets, (0, pad)).reshape(-1, NLL_BLOCK)

    def block(args):
        hb, tb = args
        logits = model.logits(hb)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tb[:, None], axis=-1)[:, 0]

    return jax.lax.map(block, (h, targets)).reshape(-1)[:t]


@partial(jax.jit, donate_argnames=("cache",))
def teacher_forced_nll(model: ToyLLM, cache: KVCache, inputs, targets):
    """Decode inputs [B, T] one step at a time; NLL [B, T] and argmax-correct [B, T] of targets."""

    def step(cache, xy):
        x, y = xy
        logits, cache = decode_rows(model, x, jnp.ones(x.shape, bool), cache)
        return cache, _score(logits, y)

    cache, (nll, correct) = jax.lax.scan(step, cache, (inputs.T, targets.T))
    return nll.T, correct.T, cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def compress_all(cache: KVCache, cfg: Policy) -> KVCache:
    return compress(cache, cfg)


@partial(jax.jit, donate_argnames=("cache",))
def _prefill_rows(model: ToyLLM, cache: KVCache, tokens):
    """tokens [B, T] (all real) into an empty batched cache -> (logits [B, vocab] after the last, cache)."""
    h, cache = model.forward(tokens, cache, jnp.full(tokens.shape[0], tokens.shape[1], jnp.int32))
    return model.logits(h[:, -1]), cache


def _empty(model: ToyLLM, cfg: Policy, batch: int, capacity: int) -> KVCache:
    signals = cfg.signals
    return empty_cache(model.cfg, batch, capacity, model.dtype, signals.scores, signals.recent_queries)


def _score(logits, targets):
    """NLL [B] of targets [B] under logits [B, vocab], and whether each is the argmax."""
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return nll, jnp.argmax(logits, axis=-1) == targets


_first_prediction = jax.jit(_score)


@dataclass
class SequenceScores:
    nll: np.ndarray  # [N] summed NLL per sequence
    tokens: np.ndarray  # [N] scored tokens per sequence
    correct: np.ndarray  # [N] argmax hits per sequence
    kept: int  # cache slots per layer and KV head at the end


@dataclass
class StreamPiece:
    """One teacher-forced piece of `decode_through_policy`: scores of its tokens, and the cache after."""

    end: int  # tokens fed so far (the piece scored tokens end - len + 1 .. end)
    nll: np.ndarray  # [B, piece]
    correct: np.ndarray  # [B, piece]
    cache: KVCache  # after the piece (and any compression); valid until the next piece is run
    length: int  # live slots in it


def decode_through_policy(model: ToyLLM, rows: np.ndarray, cfg: Policy, piece_max: int | None = None):
    """Teacher-force rows [B, T] token by token through the policy, compressing whenever the cache
    reaches budget + slack (as generation does); yields a StreamPiece per jitted call."""
    t = rows.shape[1]
    piece_max = piece_max or (cfg.slack if cfg.evicts else 64)
    cache = _empty(model, cfg, len(rows), cfg.trigger if cfg.evicts else t)
    length = done = 0
    while done < t - 1:
        piece = min(piece_max, t - 1 - done)
        if cfg.evicts:
            piece = min(piece, cfg.trigger - length)
        nll, correct, cache = teacher_forced_nll(model, cache, rows[:, done : done + piece],
                                                 rows[:, done + 1 : done + 1 + piece])
        done += piece
        length += piece
        if cfg.evicts and length >= cfg.trigger:
            cache = compress_all(cache, cfg)
            length = cfg.budget
        yield StreamPiece(done, np.asarray(nll, np.float64), np.asarray(correct), cache, length)


def streaming_scores(model: ToyLLM, sequences: np.ndarray, cfg: Policy, batch: int = 8) -> SequenceScores:
    """Teacher-forced decoding of every sequence [N, T] through the policy; scores tokens 1..T-1."""
    n, t = sequences.shape
    nll, correct = np.zeros(n), np.zeros(n)
    kept = 0
    for lo in range(0, n, batch):
        take = min(batch, n - lo)
        for piece in decode_through_policy(model, _pad_rows(sequences[lo : lo + batch], batch), cfg):
            nll[lo : lo + take] += piece.nll[:take].sum(1)
            correct[lo : lo + take] += piece.correct[:take].sum(1)
            kept = piece.length
    return SequenceScores(nll, np.full(n, t - 1), correct, kept)


def prefill_scores(model: ToyLLM, sequences: np.ndarray, context: int, cfg: Policy,
                   batch: int = 8) -> SequenceScores:
    """Prefill the first `context` tokens of each sequence [N, context + M], compress once, then
    teacher-force the remaining M; scores those M tokens."""
    n, t = sequences.shape
    m = t - context
    if m < 1 or context < 1:
        raise ValueError(f"sequences of {t} tokens leave no continuation after a context of {context}")
    nll, correct = np.zeros(n), np.zeros(n)
    kept = context
    for lo in range(0, n, batch):
        rows = _pad_rows(sequences[lo : lo + batch], batch)
        take = min(batch, n - lo)
        cache = _empty(model, cfg, batch, context + m)
        logits, cache = _prefill_rows(model, cache, rows[:, :context])
        first_nll, first_correct = _first_prediction(logits, rows[:, context])
        if cfg.evicts and context > cfg.budget:
            cache = compress_all(cache, cfg)
            kept = cfg.budget
        rest_nll, rest_correct, _ = teacher_forced_nll(model, cache, rows[:, context : t - 1], rows[:, context + 1 :])
        nll[lo : lo + take] = (np.asarray(first_nll, np.float64) + np.asarray(rest_nll, np.float64).sum(1))[:take]
        correct[lo : lo + take] = (np.asarray(first_correct) + np.asarray(rest_correct).sum(1))[:take]
    return SequenceScores(nll, np.full(n, m), correct, kept)


def _pad_rows(rows: np.ndarray, batch: int) -> np.ndarray:
    """Fill a short last batch with copies of its first row (their scores are dropped)."""
    if len(rows) == batch:
        return rows
    return np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)])


def windows(tokens: np.ndarray, length: int, max_sequences: int) -> np.ndarray:
    """Non-overlapping windows [N, length] from the start of a token stream."""
    n = min(len(tokens) // length, max_sequences)
    if n == 0:
        raise ValueError(f"the data has {len(tokens)} tokens, fewer than one sequence of {length}")
    return tokens[: n * length].reshape(n, length)


def copy_sequences(vocab: int, n: int, length: int, seed: int = 0) -> np.ndarray:
    """n rows of a random token sequence of `length` followed by the same sequence again."""
    first = np.random.default_rng(seed).integers(0, vocab, (n, length), dtype=np.int32)
    return np.concatenate([first, first], axis=1)


@dataclass
class Row:
    protocol: str
    policy: str
    budget: int | None
    perplexity: float
    delta_pct: float | None
    delta_ci95: tuple[float, float] | None
    accuracy: float
    kept_tokens: int
    cache_bytes: int
    sequences: int


def perplexity(scores: SequenceScores) -> float:
    return float(np.exp(scores.nll.sum() / scores.tokens.sum()))


def bootstrap_delta(scores: SequenceScores, reference: SequenceScores, samples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% interval of the perplexity change (%) against `reference`, resampling sequences (paired)."""
    rng = np.random.default_rng(seed)
    n = len(scores.nll)
    idx = rng.integers(0, n, (samples, n))
    ppl = np.exp(scores.nll[idx].sum(1) / scores.tokens[idx].sum(1))
    ref = np.exp(reference.nll[idx].sum(1) / reference.tokens[idx].sum(1))
    delta = 100 * (ppl / ref - 1)
    return float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5))


def evaluate(model: ToyLLM, protocol: str, sequences: np.ndarray, configs: list[Policy],
             context: int | None = None, batch: int = 8) -> list[Row]:
    """One Row per config (a `full` reference is always run first)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")

    def score(cfg: Policy) -> SequenceScores:
        if protocol == "streaming":
            return streaming_scores(model, sequences, cfg, batch)
        return prefill_scores(model, sequences, context or sequences.shape[1] // 2, cfg, batch)

    reference = score(make_policy("full"))
    full_ppl = perplexity(reference)
    rows = []
    for cfg in [make_policy("full"), *(c for c in configs if c.name != "full")]:
        scores = reference if cfg.name == "full" else score(cfg)
        ppl = perplexity(scores)
        is_full = cfg.name == "full"
        rows.append(Row(
            protocol=protocol, policy=cfg.name, budget=None if is_full else cfg.budget, perplexity=ppl,
            delta_pct=None if is_full else 100 * (ppl / full_ppl - 1),
            delta_ci95=None if is_full else bootstrap_delta(scores, reference),
            accuracy=float(scores.correct.sum() / scores.tokens.sum()), kept_tokens=scores.kept,
            cache_bytes=scores.kept * model.kv_bytes_per_token, sequences=len(sequences),
        ))
    return rows


def format_table(rows: list[Row]) -> str:
    header = (f"{'protocol':<10} {'policy':<10} {'budget':>6} {'ppl':>10} {'Δ%':>8} {'95% CI':>18} "
              f"{'acc':>6} {'kept':>6} {'bytes':>10}")
    lines = [header]
    for r in rows:
        ci = f"[{r.delta_ci95[0]:+.1f}, {r.delta_ci95[1]:+.1f}]" if r.delta_ci95 else ""
        delta = f"{r.delta_pct:+.2f}" if r.delta_pct is not None else ""
        lines.append(f"{r.protocol:<10} {r.policy:<10} {r.budget or '-':>6} {r.perplexity:>10.3f} {delta:>8} "
                     f"{ci:>18} {r.accuracy:>6.3f} {r.kept_tokens:>6} {r.cache_bytes:>10,}")
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
