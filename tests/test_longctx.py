"""The long-context protocols: generators deterministic and honest about where the answer is, and
every shortcut the runners take equal to the path it stands for (direct scoring, the engine)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from toyllm_core.chat import ChatTemplate
from toyllm_core.lab.evaluate import streaming_scores
from toyllm_core.lab.longctx import oneshot, perplexity, tasks
from toyllm_core.lab.longctx.session import run_once, run_sessions
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams

pytestmark = pytest.mark.longctx

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PROSE = "\n\n".join(
    f"Document {i}. " + " ".join(f"The {w} of item {i}-{j} was noted in the ledger on day {j}." for j in range(12)
                                  for w in ("colour", "weight", "price"))
    for i in range(8))


@pytest.fixture(scope="module")
def frame(tokenizer):
    return tasks.PromptFrame.of(tokenizer)


# ------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_passkey_is_deterministic_exact_in_length_and_puts_the_key_at_its_depth(tokenizer, frame, depth):
    a = tasks.passkey(tokenizer, frame, 700, depth, seed=3)
    b = tasks.passkey(tokenizer, frame, 700, depth, seed=3)
    assert np.array_equal(a.tokens, b.tokens) and a.answer == b.answer
    assert tasks.passkey(tokenizer, frame, 700, depth, seed=4).answer != a.answer
    assert len(a.tokens) == 700 and len(a.answer) == 5
    needle = tokenizer.decode(a.tokens[a.span[0] : a.span[1]])
    assert needle == f" The pass key is {a.answer}. Remember it. {a.answer} is the pass key."
    assert tokenizer.decode(a.tokens).count(a.answer) == 2  # only in the needle
    assert abs(a.depth - depth) < 0.05


def test_passkey_depths_are_in_order(tokenizer, frame):
    starts = [tasks.passkey(tokenizer, frame, 900, d, 0).span[0] for d in (0, 0.25, 0.5, 0.75, 1)]
    assert starts == sorted(starts) and len(set(starts)) == 5


def test_niah_places_every_needle_and_asks_for_one(tokenizer, frame):
    a = tasks.niah(tokenizer, frame, PROSE, 800, seed=1)
    b = tasks.niah(tokenizer, frame, PROSE, 800, seed=1)
    assert np.array_equal(a.tokens, b.tokens) and (a.answer, a.key) == (b.answer, b.key)
    assert len(a.tokens) == 800
    assert tokenizer.decode(a.tokens[a.span[0] : a.span[1]]) == \
        f" One of the special magic numbers for {a.key} is: {a.answer}."
    text = tokenizer.decode(a.tokens)
    assert text.count("One of the special magic numbers for") == 4  # the asked one and 3 distractors
    assert text.endswith(f"What is the special magic number for {a.key} mentioned in the provided text?\n")
    assert tasks.niah(tokenizer, frame, PROSE, 800, seed=2).answer != a.answer


def test_session_document_plants_each_fact_where_it_says(tokenizer):
    doc = tasks.session_document(tokenizer, PROSE, 600, 4, seed=5)
    again = tasks.session_document(tokenizer, PROSE, 600, 4, seed=5)
    assert doc == again
    for fact, at, question, answer in zip(doc.facts, doc.offsets, doc.questions, doc.answers, strict=True):
        assert doc.text[at : at + len(fact)] == fact
        item = question.removeprefix("In which room is the ").removesuffix(" kept?")
        assert fact == f" The {item} is kept in room {answer}."
    assert len(set(doc.questions)) == 4
    assert sorted(doc.depths) == pytest.approx([0.1, 0.1 + 0.8 / 3, 0.1 + 1.6 / 3, 0.9])
    assert doc.turn(0).endswith(doc.questions[0] + " Answer with the room number.") and doc.text in doc.turn(0)
    assert doc.text not in doc.turn(1)


# -------------------------------------------------------------------- runners against direct paths
def _direct_greedy(model, tokens: np.ndarray, n: int) -> list[int]:
    """Greedy continuation by the parallel forward, recomputed from scratch for every token."""
    seq, out = list(tokens), []
    for _ in range(n):
        nxt = int(jnp.argmax(model(jnp.asarray(seq, jnp.int32))[-1]))
        out.append(nxt)
        seq.append(nxt)
    return out


def test_oneshot_full_answers_equal_direct_scoring(model, tokenizer, frame):
    sample = tasks.passkey(tokenizer, frame, 300, 0.5, seed=0)
    got = oneshot.answers(model, sample.tokens, [make_policy("full")], 6)
    assert next(iter(got.values())) == _direct_greedy(model, sample.tokens, 6)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "adakv", "expected"])
def test_oneshot_compressed_answers_equal_the_engine_with_a_covering_prefill_window(model, tokenizer, frame, name):
    sample = tasks.passkey(tokenizer, frame, 300, 0.5, seed=0)
    policy = make_policy(name, budget=48)
    got = oneshot.answers(model, sample.tokens, [policy, make_policy("streaming", budget=48)], 6)[policy]
    cls = CacheClass.make(policy, 1, 64, prefill_window=512)
    engine = Engine(model, [cls])
    seq = engine.run_prefill(sample.tokens, cls, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
    ids = [seq.pending]
    while seq.active:
        for o in engine.step():
            ids += o.tokens
    assert got == ids


def test_ppl_stream_without_eviction_equals_the_parallel_forward(model):
    rows = np.random.default_rng(0).integers(0, 50000, (2, 97)).astype(np.int32)
    nll = perplexity.stream_nll(model, rows, make_policy("snapkv", budget=128))
    full = perplexity.stream_nll(model, rows, make_policy("full"))
    np.testing.assert_allclose(nll, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streaming"])
def test_ppl_stream_equals_token_by_token_decoding_through_the_engine(model, name):
    rows = np.random.default_rng(1).integers(0, 50000, (2, 161)).astype(np.int32)
    policy = make_policy(name, budget=48)
    chunked = perplexity.stream_nll(model, rows, policy).sum(1)
    engine = streaming_scores(model, rows, policy, batch=2)
    np.testing.assert_allclose(chunked, engine.nll, rtol=1e-6)
    # Compression did happen: the full cache scores differently (by little: a random tiny model
    # attends almost uniformly, so what it evicts hardly matters).
    full = perplexity.stream_nll(model, rows, make_policy("full")).sum(1)
    assert np.abs(chunked - full).max() > 10 * np.abs(chunked - engine.nll).max()


def test_block_bootstrap_is_zero_against_itself_and_brackets_a_shift():
    nll = np.random.default_rng(0).uniform(1, 3, (2, 1024))
    assert perplexity.block_bootstrap(nll, nll) == (0.0, 0.0)
    lo, hi = perplexity.block_bootstrap(nll + 0.01, nll)
    assert lo < 100 * (np.exp(0.01) - 1) < hi + 1e-9 and lo > 0


def test_session_first_turn_under_full_equals_direct_greedy(model, tokenizer):
    chat = ChatTemplate(CHATML)
    doc = tasks.session_document(tokenizer, PROSE, 200, 2, seed=0)
    turns = run_sessions(model, tokenizer, chat, doc, [make_policy("full"), make_policy("snapkv", budget=64)],
                         max_new_tokens=5)
    prompt = np.asarray(tokenizer(chat.render([{"role": "user", "content": doc.turn(0)}]),
                                  add_special_tokens=False)["input_ids"], np.int32)
    full, snap = turns.values()
    assert len(full) == len(snap) == 2
    assert full[0].reply == tokenizer.decode(_direct_greedy(model, prompt, 5), skip_special_tokens=True)
    assert [t.question for t in full] == doc.questions


def test_prefill_window_sets_the_prefill_cache_and_when_a_prompt_compresses():
    from toyllm_core.serving.engine import next_piece, plan_classes

    policy = make_policy("snapkv", budget=64)
    (cls,) = plan_classes([policy], 1000, 4, 1 << 20, 128, [256], prefill_window=1024)
    assert (cls.prefill_window, cls.prefill_capacity, cls.capacity) == (1024, 64 + 1024 + 16, 64 + 16)
    # A 1000-token prompt goes in whole before the one compression after it ...
    length = 0
    while length < 1000:
        piece = next_piece(cls, length, 1000 - length, 128)
        assert not piece.compress_first
        length += piece.real
    # ... while the default window (one chunk) compresses whenever kept + 128 slots are full.
    default = CacheClass.make(policy, 1, 128)
    assert default.prefill_window == 128 and next_piece(default, 64 + 128, 500, 128).compress_first
    with pytest.raises(ValueError, match="must not be shorter than the chunk"):
        CacheClass.make(policy, 1, 128, prefill_window=64)


def test_compress_once_protocol_asks_the_same_first_question_as_the_session(model, tokenizer):
    # kvpress's protocol reads the document, then asks: under the full cache, the first question's
    # prompt is the session's first turn token for token, so the answer is the same.
    chat = ChatTemplate(CHATML)
    doc = tasks.session_document(tokenizer, PROSE, 200, 2, seed=0)
    policies = [make_policy("full"), make_policy("snapkv", budget=64), make_policy("snapkv", budget=64, cold_bits=0)]
    once = run_once(model, tokenizer, chat, doc, policies, max_new_tokens=5)
    session = run_sessions(model, tokenizer, chat, doc, policies[:1], max_new_tokens=5)
    assert once[policies[0]][0].reply == session[policies[0]][0].reply
    assert all(len(turns) == 2 for turns in once.values())
