"""Does a model beat a frequency table, and does it read its context?

The numbers a model card reports for a small trained model, each against a fixed reference:

- word-level perplexity of an evaluation text against a unigram model (add-one smoothed token
  frequencies of the *training* corpus, scored with the same tokenizer): exp(total NLL / words), so
  the two are comparable whatever the tokenization;
- mean loss by position over non-overlapping windows of the evaluation text: a model that uses its
  context predicts late positions (513-1023 of 1024) better than early ones (17-64), where it has
  little;
- copy accuracy: a random token sequence followed by itself, with a full cache; the second copy
  can only be predicted by finding the first.
"""

from __future__ import annotations

import jax
import numpy as np

from ..serving.model import ToyLLM
from ..serving.policies import make_policy
from .evaluate import _window_nll, copy_task, corpus_perplexity, evaluate, windows

# Positions: the 0-based index of the predicted token in its window; spans are inclusive.
EARLY = (17, 64)


def late_span(seq_len: int) -> tuple[int, int]:
    """The second half of a window: 513-1023 for 1024-token windows."""
    return seq_len // 2 + 1, seq_len - 1


def unigram_nll(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Summed NLL of eval_tokens[1:] (the tokens a model is scored on) under add-one smoothed
    token frequencies of train_tokens."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[eval_tokens[1:]].sum())


def loss_by_position(model: ToyLLM, sequences: np.ndarray, batch: int = 4) -> np.ndarray:
    """Mean NLL [T] over sequences [N, T] of the token at each position given the ones before it
    (position 0 has no prediction: NaN)."""
    nll_fn = jax.jit(jax.vmap(_window_nll, in_axes=(None, 0)))
    n, t = sequences.shape
    total = np.zeros(t - 1)
    for lo in range(0, n, batch):
        rows = sequences[lo : lo + batch]
        padded = np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)])  # one compiled shape
        total += np.asarray(nll_fn(model, padded), np.float64)[: len(rows)].sum(0)
    return np.concatenate([[np.nan], total / n])


def mean_over(by_position: np.ndarray, span: tuple[int, int]) -> float:
    lo, hi = span
    if hi >= len(by_position):
        raise ValueError(f"positions {lo}-{hi} need windows of at least {hi + 1} tokens, not {len(by_position)}")
    return float(np.mean(by_position[lo : hi + 1]))


def copy_accuracy(model: ToyLLM, seq_len: int, sequences: int, batch: int = 8, seed: int = 0) -> float:
    """Argmax accuracy on the second copy of random spans of seq_len / 2 tokens, full cache."""
    rows, context = copy_task(model.cfg.vocab_size, sequences, seq_len, seed=seed)
    return evaluate(model, "copy", rows, [make_policy("full")], context, batch)[0].accuracy


def report(model: ToyLLM, eval_text: str, eval_tokens: np.ndarray, train_tokens: np.ndarray,
           seq_len: int = 1024, max_windows: int = 1 << 30, copy_sequences_n: int = 32, batch: int = 4) -> dict:
    """Every number above for one model; JSON-ready."""
    if seq_len > model.cfg.context_length:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({model.cfg.context_length})")
    words = len(eval_text.split())
    corpus = corpus_perplexity(model, eval_tokens, words, seq_len, batch)
    unigram = unigram_nll(train_tokens, eval_tokens, model.cfg.vocab_size)
    unigram_word_ppl = float(np.exp(unigram / words))
    scored = windows(eval_tokens, seq_len, max_windows)
    by_position = loss_by_position(model, scored, batch)
    early, late = mean_over(by_position, EARLY), mean_over(by_position, late_span(seq_len))
    return {
        "eval_tokens": len(eval_tokens), "eval_words": words,
        "token_perplexity": corpus.token_perplexity, "word_perplexity": corpus.word_perplexity,
        "unigram_token_perplexity": float(np.exp(unigram / (len(eval_tokens) - 1))),
        "unigram_word_perplexity": unigram_word_ppl,
        "word_perplexity_vs_unigram": corpus.word_perplexity / unigram_word_ppl,
        "windows": len(scored), "window_tokens": seq_len,
        "loss_early": early, "loss_late": late, "late_minus_early": late - early,
        "early_positions": list(EARLY), "late_positions": list(late_span(seq_len)),
        "loss_by_position_64": [round(float(x), 4) for x in _bucket_means(by_position, 64)],
        "copy_length": seq_len // 2, "copy_sequences": copy_sequences_n,
        "copy_accuracy_full": copy_accuracy(model, seq_len, copy_sequences_n),
    }


def _bucket_means(by_position: np.ndarray, width: int) -> list[float]:
    """Mean loss per bucket of `width` positions (position 0, which has none, left out)."""
    return [float(np.nanmean(by_position[lo : lo + width])) for lo in range(0, len(by_position), width)]
