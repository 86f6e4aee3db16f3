"""Perplexity against cache budget, under three protocols, batched across sequences.

- `streaming`: teacher-forced token-by-token decoding through the policy (compressing whenever the
  cache reaches budget + slack, as generation does); the NLL of every next token.
- `prefill`: prefill `context` tokens (compressed to the budget after the prompt, and every
  budget + 512 tokens for a longer one), then teacher-force the next `continuation` tokens with no
  further compression; perplexity on those.
- `copy`: a random token sequence, then the same sequence again; accuracy and perplexity on the
  second copy, which the model can only get right by retrieving from the compressed cache.

Every protocol runs through the inference `Engine`: sequences start by its one recipe (prefill,
first token, a decode slot), and the teacher-forced tokens go through its decode path
(`Engine.force`), compressing where the server would. Every (policy, budget) runs over the same
sequences, so changes against `full` are paired: their 95% interval comes from a bootstrap over
sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..serving.engine import CacheClass, Engine, Sequence
from ..serving.model import ToyLLM
from ..serving.policies import Policy, make_policy
from ..serving.sampling import SamplingParams

MAX_CHUNK = 512  # the engine's longest prefill chunk here

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
    """One teacher-forced piece of `decode_through_policy`: scores of its tokens, and where to read
    what the cache keeps after it."""

    end: int  # tokens fed so far (the piece scored tokens end - len + 1 .. end)
    nll: np.ndarray  # [B, piece]
    correct: np.ndarray  # [B, piece]
    engine: Engine
    seqs: list[Sequence]

    @property
    def length(self) -> int:
        """Live slots of the first row after the piece (and any compression)."""
        return self.seqs[0].length

    def kept_positions(self, row: int = 0) -> np.ndarray:
        """Original positions row `row` keeps now: [layers, kv_heads, length]."""
        return self.engine.kept_positions(self.seqs[row])


def _start_rows(engine: Engine, cls: CacheClass, prompts: np.ndarray, targets: np.ndarray):
    """Start one sequence per row of prompts [B, c] through the engine's recipe (prefill, first
    token, a decode slot); returns (sequences, NLL [B] and argmax-correct [B] of targets [B] after
    each prompt)."""
    seqs, logits = [], []
    for prompt in prompts:
        job = engine.begin(prompt, cls, _FORCED)
        while not engine.prefill(job):
            pass
        logits.append(job.logits)
        seqs.append(engine.start(job))
    nll, correct = _first_prediction(jnp.stack(logits), jnp.asarray(targets))
    return seqs, np.asarray(nll, np.float64), np.asarray(correct)


# Teacher-forced sequences never stop by themselves (the engine is fed their tokens, not samples).
_FORCED = SamplingParams(max_new_tokens=2**30, temperature=0.0, ignore_eos=True)


def decode_through_policy(model: ToyLLM, rows: np.ndarray, cfg: Policy, piece_max: int | None = None):
    """Teacher-force rows [B, T] token by token through the policy in the engine, compressing
    whenever the cache reaches budget + slack (as generation does); yields a StreamPiece per call."""
    t = rows.shape[1]
    piece_max = piece_max or (cfg.slack if cfg.evicts else 64)
    cls = CacheClass.make(cfg, len(rows), MAX_CHUNK, None if cfg.evicts else t)
    engine = Engine(model, [cls])
    seqs, nll, correct = _start_rows(engine, cls, rows[:, :1], rows[:, 1])
    done = 1
    yield StreamPiece(done, nll[:, None], correct[:, None], engine, seqs)
    while done < t - 1:
        piece = min(piece_max, t - 1 - done, min(engine.room(s) for s in seqs))
        nll, correct = engine.force(cls, rows[:, done : done + piece], rows[:, done + 1 : done + 1 + piece])
        done += piece
        yield StreamPiece(done, nll, correct, engine, seqs)


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
    """Prefill the first `context` tokens of each sequence [N, context + M] through the engine
    (which compresses after the prompt when it leaves more than the budget), then teacher-force the
    remaining M with no further compression; scores those M tokens."""
    n, t = sequences.shape
    m = t - context
    if m < 1 or context < 1:
        raise ValueError(f"sequences of {t} tokens leave no continuation after a context of {context}")
    max_chunk = max(MAX_CHUNK, 1 << (m - 1).bit_length())
    # Room for the whole continuation before the next compression: the slack covers it.
    policy = dataclasses.replace(cfg, slack=max(cfg.slack, m)) if cfg.evicts else cfg
    nll, correct = np.zeros(n), np.zeros(n)
    kept = context
    for lo in range(0, n, batch):
        rows = _pad_rows(sequences[lo : lo + batch], batch)
        take = min(batch, n - lo)
        cls = CacheClass.make(policy, batch, max_chunk, None if cfg.evicts else t)
        engine = Engine(model, [cls])
        seqs, first_nll, first_correct = _start_rows(engine, cls, rows[:, :context], rows[:, context])
        kept = seqs[0].length
        total_nll, total_correct = first_nll, first_correct.astype(np.int64)
        if m > 1:
            rest_nll, rest_correct = engine.force(cls, rows[:, context : t - 1], rows[:, context + 1 :])
            total_nll, total_correct = total_nll + rest_nll.sum(1), total_correct + rest_correct.sum(1)
        nll[lo : lo + take] = total_nll[:take]
        correct[lo : lo + take] = total_correct[:take]
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


def copy_task(vocab: int, n: int, seq_len: int, context: int | None = None, answer: int | None = None,
              seed: int = 0) -> tuple[np.ndarray, int]:
    """The copy protocol's sequences and prefill length: a random span of seq_len / 2 tokens twice.
    The first `context` tokens are prefilled (and compressed), and the `answer` tokens after them
    are scored. By default the context is the first copy and the answer the whole second one; a
    context that runs into the second copy gives a cue (its first tokens), and a short answer then
    asks for what follows the cue: whether the policy kept that part of the first copy."""
    half = seq_len // 2
    context = half if context is None else context
    answer = seq_len - context if answer is None else answer
    if not 1 <= context < seq_len or answer < 1 or context + answer > seq_len:
        raise ValueError(f"the copy protocol needs 1 <= context < seq_len and 1 <= answer <= seq_len - context "
                         f"(seq_len {seq_len}, context {context}, answer {answer})")
    return copy_sequences(vocab, n, half, seed)[:, : context + answer], context


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
