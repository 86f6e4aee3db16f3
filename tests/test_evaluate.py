"""Evaluation protocols: full (and any policy with budget >= length) equals the parallel forward."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from toyllm_core.lab.evaluate import (
    copy_sequences,
    corpus_perplexity,
    evaluate,
    perplexity,
    prefill_scores,
    streaming_scores,
)
from toyllm_core.serving.policies import make_policy as CacheConfig

pytestmark = pytest.mark.lab  # the lab's tools (make test-lab)

SEQS = np.random.default_rng(0).integers(0, 50257, (5, 96), dtype=np.int32)


def _reference_ppl(model, sequences, start=1):
    """exp(mean NLL) of tokens start..T-1 from the parallel causal forward."""
    logits = np.asarray(jax.jit(jax.vmap(model.__call__))(sequences), np.float64)
    top = logits.max(-1)
    logz = np.log(np.exp(logits - top[..., None]).sum(-1)) + top
    nll = logz[:, :-1] - np.take_along_axis(logits[:, :-1], sequences[:, 1:, None], -1)[..., 0]
    return float(np.exp(nll[:, start - 1 :].mean()))


@pytest.mark.parametrize("cfg", [CacheConfig("full"), CacheConfig("snapkv", budget=128), CacheConfig("h2o", budget=100)])
def test_streaming_with_full_or_large_budget_equals_parallel_forward(model, cfg):
    ppl = perplexity(streaming_scores(model, SEQS, cfg, batch=4))
    assert ppl == pytest.approx(_reference_ppl(model, SEQS), rel=1e-4)


def test_prefill_protocol_with_full_equals_parallel_forward_on_the_continuation(model):
    scores = prefill_scores(model, SEQS, context=60, cfg=CacheConfig("full"), batch=4)
    assert (scores.tokens == 36).all()
    assert perplexity(scores) == pytest.approx(_reference_ppl(model, SEQS, start=60), rel=1e-4)


def test_compressing_changes_the_streaming_perplexity_and_keeps_the_budget(model):
    rows = evaluate(model, "streaming", SEQS, [CacheConfig("streaming", budget=32)], batch=4)
    full, streaming = rows
    assert full.policy == "full" and full.delta_pct is None
    assert streaming.kept_tokens <= 32 + 16 and streaming.perplexity != full.perplexity
    low, high = streaming.delta_ci95
    assert low <= streaming.delta_pct <= high


def test_copy_sequences_repeat_themselves():
    seqs = copy_sequences(50257, 3, 40)
    assert seqs.shape == (3, 80) and (seqs[:, :40] == seqs[:, 40:]).all()


def test_cli_eval_writes_json_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", "--preset", "tiny", "--protocol", "copy",
         "--policies", "snapkv", "--budgets", "24,40", "--seq-len", "128", "--max-sequences", "4", "--batch", "4",
         "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")],
        capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [(r["policy"], r["budget"]) for r in rows] == [("full", None), ("snapkv", 24), ("snapkv", 40)]
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corpus_perplexity_scores_every_token_once_and_matches_one_forward(model):
    tokens = SEQS[0]
    whole = corpus_perplexity(model, tokens, words=40, seq_len=128)
    assert whole.token_perplexity == pytest.approx(_reference_ppl(model, tokens[None]), rel=1e-4)
    assert whole.word_perplexity == pytest.approx(np.exp(whole.nll / 40), rel=1e-9)
    strided = corpus_perplexity(model, tokens, words=40, seq_len=32, batch=2)
    # Every token but the first is scored exactly once, with less context than one forward gives.
    assert np.log(strided.token_perplexity) * (len(tokens) - 1) == pytest.approx(strided.nll, rel=1e-6)
    assert strided.token_perplexity == pytest.approx(whole.token_perplexity, rel=0.05)
