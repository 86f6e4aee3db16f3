"""Training: the loss goes down, resume continues the same run, the final checkpoint loads."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyllm_core import checkpoint
from toyllm_core.config import get_preset
from toyllm_core.lab.train import TrainConfig, batch_loss, train
from toyllm_core.serving.model import ToyLLM

pytestmark = pytest.mark.lab  # the lab's tools (make test-lab)

# A small, very learnable corpus: a repeating cycle of 50 token ids.
TOKENS = np.tile(np.arange(1000, 1050, dtype=np.int32), 200)
CFG = TrainConfig(preset="tiny", seq_len=32, batch_size=4, steps=30, lr=1e-2, warmup_steps=3, log_every=1,
                  eval_every=10, eval_batches=2, checkpoint_every=10)


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    summary = train(CFG, TOKENS, TOKENS, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert summary["final_heldout_loss"] < losses[0]
    _, hf = checkpoint.load(tmp_path / "run" / "final")
    assert hf["toyllm"]["steps"] == 30 and hf["toyllm"]["tokens_seen"] == 30 * 4 * 32


def test_resume_continues_the_same_run(tmp_path):
    import toyllm_core.lab.train as t

    train(CFG, TOKENS, None, tmp_path / "straight")
    # Interrupt the same run right after its step-20 state was saved, then resume it.

    class Stop(Exception):
        pass

    original = t._save_state

    def save_then_stop(directory, model, opt_state, step, *args):
        original(directory, model, opt_state, step, *args)
        if step == 20:
            raise Stop

    t._save_state = save_then_stop
    try:
        with pytest.raises(Stop):
            train(CFG, TOKENS, None, tmp_path / "resumed")
    finally:
        t._save_state = original
    train(CFG, TOKENS, None, tmp_path / "resumed", resume=True)
    a, _ = checkpoint.load(tmp_path / "straight" / "final")
    b, _ = checkpoint.load(tmp_path / "resumed" / "final")
    np.testing.assert_allclose(np.asarray(a.embed), np.asarray(b.embed), rtol=1e-5, atol=1e-6)
    assert _losses(tmp_path / "resumed")[-10:] == pytest.approx(_losses(tmp_path / "straight")[-10:], rel=1e-4)


def test_resume_refuses_other_settings(tmp_path):
    train(TrainConfig(**{**CFG.__dict__, "steps": 2}), TOKENS, None, tmp_path / "run")
    with pytest.raises(ValueError, match="other settings"):
        train(TrainConfig(**{**CFG.__dict__, "steps": 4}), TOKENS, None, tmp_path / "run", resume=True)


def test_a_trained_bpe_sizes_the_model_and_has_its_own_token_cache(tmp_path, tokenizer):
    from toyllm_core.lab.train import model_config, tokenize
    from toyllm_core.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    text = "\n\n".join(f"The river {i} flows past the old mill and the church." for i in range(200))
    bpe = train_bpe(text.split("\n\n"), vocab_size=300)
    save_tokenizer(bpe, tmp_path / "tok")
    bpe = load_tokenizer(tmp_path / "tok")
    assert len(bpe) == 300 and bpe.eos_token_id == 0
    assert bpe.decode(bpe("flows past the mill")["input_ids"]) == "flows past the mill"
    ours, gpt2 = tokenize(bpe, text, tmp_path / "cache"), tokenize(tokenizer, text, tmp_path / "cache")
    assert ours.max() < 300 and not np.array_equal(ours[:50], gpt2[:50])
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cached array per tokenizer
    cfg = model_config(TrainConfig(preset="tiny", vocab_size=len(bpe), eos_token_id=bpe.eos_token_id))
    assert cfg.vocab_size == 300 and cfg.eos_token_id == 0


def test_a_time_limit_stops_early_and_still_writes_the_checkpoint(tmp_path):
    summary = train(CFG, TOKENS, None, tmp_path / "run", time_limit_s=0.0)
    assert summary["stopped_early"] and summary["steps"] == 0
    _, hf = checkpoint.load(tmp_path / "run" / "final")
    assert hf["toyllm"]["stopped_early"] is True


def test_the_seed_preset_trains_end_to_end(tmp_path):
    cfg = TrainConfig(preset="seed", seq_len=64, batch_size=2, steps=12, lr=1e-2, warmup_steps=2, log_every=1,
                      eval_every=12, eval_batches=1, checkpoint_every=12)
    summary = train(cfg, TOKENS, TOKENS, tmp_path / "seed")
    losses = _losses(tmp_path / "seed")
    assert np.mean(losses[-3:]) < losses[0]
    model, hf = checkpoint.load(tmp_path / "seed" / "final")
    assert model.cfg == get_preset("seed") and hf["toyllm"]["steps"] == 12 and np.isfinite(summary["final_heldout_loss"])


def test_copy_share_repeats_a_span_in_that_share_of_windows_and_leaves_the_others_alone():
    from dataclasses import replace

    from toyllm_core.lab.train import repeat_span, sample_batch

    corpus = np.random.default_rng(0).permutation(20000).astype(np.int32)  # no token repeats by itself
    plain_cfg = replace(CFG, batch_size=64, seq_len=128)
    plain, plain_weights = sample_batch(corpus, 7, plain_cfg)
    mixed, _ = sample_batch(corpus, 7, replace(plain_cfg, copy_share=0.5))
    assert np.array_equal(sample_batch(corpus, 7, replace(plain_cfg, copy_share=0.5))[0], mixed)  # (seed, step) only
    assert plain_weights.shape == (64, 128) and (plain_weights == 1).all()  # every target scored
    changed = [r for r in range(64) if not np.array_equal(plain[r], mixed[r])]
    assert 16 <= len(changed) <= 48  # about half of the windows
    for r in changed:
        # The changed window is the plain one with one later stretch overwritten by an earlier one.
        diff = np.flatnonzero(plain[r] != mixed[r])
        dst, length = diff[0], diff[-1] - diff[0] + 1
        src = np.flatnonzero(plain[r] == mixed[r][dst])[0]
        assert length >= 8 and src + length <= dst
        np.testing.assert_array_equal(mixed[r][dst : dst + length], plain[r][src : src + length])
    # repeat_span itself: non-overlapping, at most half the window, in place.
    window = np.arange(40)
    src, dst, length = repeat_span(window, np.random.default_rng(3))
    assert 8 <= length <= 20 and src + length <= dst and dst + length <= 40
    np.testing.assert_array_equal(window[dst : dst + length], np.arange(src, src + length))
    with pytest.raises(ValueError, match="copy_share"):
        sample_batch(corpus, 0, replace(plain_cfg, copy_share=1.5))


def test_copy_random_fills_that_share_of_the_repeated_spans_with_random_tokens():
    from dataclasses import replace

    from toyllm_core.lab.train import sample_batch

    corpus = (np.arange(20000) % 1000 + 1000).astype(np.int32)  # text tokens are >= 1000
    cfg = replace(CFG, vocab_size=1000, batch_size=64, seq_len=128, copy_share=1.0)
    text_copies, _ = sample_batch(corpus, 3, cfg)
    assert (text_copies >= 1000).all()
    mixed, _ = sample_batch(corpus, 3, replace(cfg, copy_random=0.5))
    random_rows = [r for r in range(64) if (mixed[r] < 1000).any()]
    assert 16 <= len(random_rows) <= 48
    for r in random_rows:
        where = np.flatnonzero(mixed[r] < 1000)  # the span and its repeat, both random, equal
        half = len(where) // 2
        assert len(where) == 2 * half and half >= 8 and where[half - 1] < where[half]
        np.testing.assert_array_equal(mixed[r][where[:half]], mixed[r][where[half:]])
        assert (mixed[r][where] >= 1).all()  # never token 0 (EOS)
    with pytest.raises(ValueError, match="copy_random"):
        sample_batch(corpus, 0, replace(cfg, copy_random=-0.1))


def test_init_from_starts_from_a_checkpoint_and_refuses_another_shape(tmp_path):
    from dataclasses import replace

    first = train(replace(CFG, steps=2), TOKENS, None, tmp_path / "first")
    start, _ = checkpoint.load(tmp_path / "first" / "final")
    cfg = replace(CFG, steps=1, lr=0.0, warmup_steps=1, init_from=str(tmp_path / "first" / "final"))
    train(cfg, TOKENS, None, tmp_path / "second")  # a zero learning rate: the weights stay as they start
    after, _ = checkpoint.load(tmp_path / "second" / "final")
    np.testing.assert_array_equal(np.asarray(after.embed), np.asarray(start.embed))
    assert first["steps"] == 2
    with pytest.raises(ValueError, match="is not the one this run trains"):
        train(replace(cfg, seq_len=600), TOKENS, None, tmp_path / "third")  # a longer context: another shape


def test_stop_at_stops_on_that_step_with_the_full_schedule(tmp_path):
    summary = train(CFG, TOKENS, None, tmp_path / "run", stop_at=5)
    assert summary["stopped_early"] and summary["steps"] == 5
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert state["step"] == 5 and state["config"]["steps"] == CFG.steps
    resumed = train(CFG, TOKENS, None, tmp_path / "run", resume=True)
    assert resumed["steps"] == CFG.steps and not resumed["stopped_early"]


def test_induction_share_writes_a_random_sequence_of_random_length_twice_and_scores_only_its_second_copy():
    from dataclasses import replace

    from toyllm_core.lab.train import INDUCTION_MIN, sample_batch

    corpus = (np.arange(20000) % 1000 + 1000).astype(np.int32)  # text tokens are >= 1000
    cfg = replace(CFG, vocab_size=1000, batch_size=64, seq_len=40, induction_share=0.5)
    batch, weights = sample_batch(corpus, 4, cfg)
    rows = [r for r in range(64) if (batch[r] < 1000).all()]
    assert 16 <= len(rows) <= 48
    for r in range(64):
        if r not in rows:  # text windows: untouched, every target scored
            assert (batch[r] >= 1000).all() and (weights[r] == 1).all()
    lengths = set()
    for r in rows:
        scored = np.flatnonzero(weights[r])  # targets batch[r, t + 1] for these t
        length = len(scored) + 1  # the copy's first token is not scored
        lengths.add(length)
        assert INDUCTION_MIN <= length <= 20 and scored[-1] == 39 and np.all(np.diff(scored) == 1)
        np.testing.assert_array_equal(batch[r][41 - length :], batch[r][41 - 2 * length : 41 - length])
        assert (batch[r] >= 1).all()  # never token 0 (EOS)
    assert len(lengths) > 3  # the length varies, so no single offset solves it
    # The loss is the mean NLL over the scored targets only.
    model = ToyLLM(replace(get_preset("tiny"), vocab_size=2000, eos_token_id=0), jax.random.PRNGKey(0))
    pick = [rows[0], next(r for r in range(64) if r not in rows)]  # one induction window, one text window
    nll = [-np.asarray(jax.nn.log_softmax(model(jnp.asarray(batch[r, :-1]))))[np.arange(40), batch[r, 1:]]
           for r in pick]
    expected = sum((n * weights[r]).sum() for n, r in zip(nll, pick)) / weights[pick].sum()
    got = float(batch_loss(model, jnp.asarray(batch[pick]), jnp.asarray(weights[pick])))
    assert got == pytest.approx(expected, rel=1e-5)
    plain_mean = float(np.mean(np.concatenate(nll)))
    ones = jnp.ones((2, 40), jnp.float32)
    assert float(batch_loss(model, jnp.asarray(batch[pick]), ones)) == pytest.approx(plain_mean, rel=1e-5)
    assert abs(got - plain_mean) > 1e-3  # the unscored targets left out
