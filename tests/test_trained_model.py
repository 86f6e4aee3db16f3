"""The shipped small model (weights/toyllm-base) copies: it repeats a random 64-token sequence, and
at a budget well below the context SnapKV keeps the part of the first copy the answer needs, where
StreamingLLM's recent window has dropped it (its MODEL_CARD.md, "Copying under compression").
Margins: measured full 1.000, snapkv 1.000 and streaming 0.125 at budget 48 on these sequences."""

from __future__ import annotations

from pathlib import Path

import pytest

from toyllm_core import checkpoint
from toyllm_core.evaluate import copy_task, evaluate
from toyllm_core.policies import make_policy

BASE = Path(__file__).resolve().parents[1] / "weights" / "toyllm-base"


@pytest.fixture(scope="module")
def base():
    model, _ = checkpoint.load(BASE)
    return model.for_inference()


def test_full_cache_copies_a_random_sequence(base):
    seqs, context = copy_task(base.cfg.vocab_size, 16, seq_len=128, seed=0)  # 64 tokens, then again
    (full,) = evaluate(base, "copy", seqs, [], context, batch=16)
    assert full.accuracy >= 0.9


def test_snapkv_keeps_the_answer_that_streaming_drops(base):
    # 64 random tokens, then their first 16 again (the cue): 80 tokens compressed to 48 slots. The 8
    # tokens that follow the cue in the first copy are the answer. The recent window holds the cue and
    # the first copy's tail, not the answer; SnapKV's observation window attends where the cue matches.
    seqs, context = copy_task(base.cfg.vocab_size, 32, seq_len=128, context=80, answer=8, seed=0)
    full, streaming, snapkv = evaluate(base, "copy", seqs, [make_policy("streaming", budget=48),
                                                            make_policy("snapkv", budget=48)], context, batch=16)
    assert streaming.kept_tokens == snapkv.kept_tokens == 48
    assert full.accuracy >= 0.9
    assert snapkv.accuracy - streaming.accuracy >= 0.5, (snapkv.accuracy, streaming.accuracy)
