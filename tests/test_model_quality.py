"""The model card's measurements: the unigram baseline, loss by position, the copy task."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from toyllm_core.lab.evaluate import copy_task
from toyllm_core.lab.model_quality import loss_by_position, mean_over, unigram_nll

pytestmark = pytest.mark.lab  # the lab's tools (make test-lab)


def test_unigram_nll_is_add_one_smoothed_training_frequencies():
    train = np.array([0, 0, 0, 1, 2, 2], np.int32)  # counts 3, 1, 2, 0 -> +1 each: 4, 2, 3, 1 of 10
    evaluated = np.array([3, 0, 1, 3], np.int32)  # the first token is not scored
    expected = -(np.log(4 / 10) + np.log(2 / 10) + np.log(1 / 10))
    assert unigram_nll(train, evaluated, vocab_size=4) == pytest.approx(expected, rel=1e-12)


def test_loss_by_position_is_the_mean_nll_of_each_position_over_windows(model):
    seqs = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (5, 40), dtype=np.int32)
    by_position = loss_by_position(model, seqs, batch=2)  # two batches, the last one padded
    logits = np.asarray(jax.jit(jax.vmap(model.__call__))(seqs), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz[:, :-1] - np.take_along_axis(logits[:, :-1], seqs[:, 1:, None], -1)[..., 0]
    assert np.isnan(by_position[0]) and by_position.shape == (40,)
    np.testing.assert_allclose(by_position[1:], nll.mean(0), rtol=1e-4)
    assert mean_over(by_position, (3, 5)) == pytest.approx(nll.mean(0)[2:5].mean(), rel=1e-4)
    with pytest.raises(ValueError, match="windows of at least 41 tokens"):
        mean_over(by_position, (17, 40))


def test_copy_task_defaults_to_the_whole_second_copy_and_can_cue_a_short_answer():
    seqs, context = copy_task(100, 3, 64, seed=2)
    assert seqs.shape == (3, 64) and context == 32 and (seqs[:, :32] == seqs[:, 32:]).all()
    cued, context = copy_task(100, 3, 64, context=40, answer=4, seed=2)
    assert context == 40 and (cued == seqs[:, :44]).all()  # 8 cue tokens, then the 4 that follow them
    for bad in [{"context": 64}, {"context": 0}, {"context": 40, "answer": 25}]:
        with pytest.raises(ValueError, match="copy protocol needs"):
            copy_task(100, 3, 64, **bad)


def test_cli_quality_protocol_reports_every_number(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    (tmp_path / "valid.txt").write_text(" ".join(rng.choice(words, 700)) + "\n")
    (tmp_path / "train.txt").write_text(" ".join(rng.choice(words, 2000)) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", "--preset", "tiny", "--protocol", "quality",
         "--data", f"file:{tmp_path / 'valid.txt'}", "--train-data", f"file:{tmp_path / 'train.txt'}",
         "--seq-len", "512", "--max-sequences", "2", "--json", str(tmp_path / "q.json")],
        capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["eval_words"] == 700 and report["windows"] == min(report["eval_tokens"] // 512, 2)
    # Random weights: worse than counting, and no better late in a window than early.
    assert report["word_perplexity_vs_unigram"] > 1
    assert report["copy_length"] == 256 and report["copy_sequences"] == 2 and report["copy_accuracy_full"] < 0.05
    assert "word-level perplexity" in result.stdout


def test_cli_quality_protocol_needs_data():
    result = subprocess.run([sys.executable, "-m", "server.cli", "eval", "--preset", "tiny", "--protocol", "quality"],
                            capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode != 0 and "--data is required for the quality protocol" in result.stderr
