"""Cached decoding equals full recomputation (stacked layers, every head layout); prefill chunks,
batches, and rows joining and leaving the decode slots do too; bfloat16 tracks float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model

from toyllm_core import jit_stats
from toyllm_core.lab.verify import cached_vs_recomputed
from toyllm_core.serving.cache import empty_cache
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.engine.steps import prefill_chunk, teacher_forced
from toyllm_core.serving.generate import generate_tokens
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.serving.signals import RecentQueries

FULL = make_policy("full")


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 50257, n, dtype=np.int32)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cached_decode_equals_recomputation(n_kv_heads):
    assert cached_vs_recomputed(tiny_model(n_kv_heads), length=300).cached_vs_recomputed < 1e-4


def test_float64_reference_separates_rounding_from_cache_error():
    check = cached_vs_recomputed(tiny_model(), length=64, float64=True)
    assert 0 < check.recomputed_vs_float64 < 1e-4 and 0 < check.cached_vs_float64 < 1e-4


def test_layers_are_stacked_and_scanned(model):
    assert model.blocks.attn.wq.shape == (model.cfg.n_layers, model.cfg.n_heads * model.cfg.head_dim,
                                          model.cfg.d_model)
    # One scan over layers: the jaxpr holds one copy of the block, whatever the depth.
    deep = tiny_model(2, n_layers=6)
    eqns = jax.make_jaxpr(deep.hidden)(_tokens(8)).jaxpr.eqns
    assert sum(e.primitive.name == "scan" for e in eqns) == 1
    assert sum(e.primitive.name == "dot_general" for e in eqns) == 0  # all inside the scan


def test_inference_layout_gives_the_same_logits(model):
    # float32: the layout changes nothing but the storage.
    fast = model.for_inference()
    assert fast.embed_bits is None
    assert cached_vs_recomputed(fast, length=100).cached_vs_recomputed < 1e-4  # batch-1 decode vs parallel forward
    h = model.hidden(_tokens(5))
    np.testing.assert_allclose(np.asarray(fast.logits(h[-1:])), np.asarray(model.logits(h[-1:])), atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.logits(h)), np.asarray(model.logits(h)), atol=1e-5)


def test_bfloat16_inference_layout_stores_bits_and_computes_the_same():
    """bfloat16 weights stored as their bits (blocks) and the embedding's bits for the lookup: the
    same numbers as the plain bfloat16 model, bit for bit."""
    plain = tiny_model(2, seed=3).astype(jnp.bfloat16)
    fast = plain.for_inference()
    assert fast.embed_bits.dtype == jnp.uint16 and fast.blocks.mlp.w_up.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(fast.embedding(jnp.arange(7))),
                                  np.asarray(plain.embed[:7].astype(jnp.float32)))
    tokens = _tokens(24)
    cache = empty_cache(plain.cfg, 1, 32, jnp.bfloat16)
    h_plain, _ = plain.forward(tokens[None], cache, jnp.array([24]))
    h_fast, _ = fast.forward(tokens[None], cache, jnp.array([24]))
    np.testing.assert_array_equal(np.asarray(h_fast), np.asarray(h_plain))
    np.testing.assert_array_equal(np.asarray(fast.logits(h_fast[0, -1:])), np.asarray(plain.logits(h_plain[0, -1:])))


def test_prefill_chunk_against_existing_cache_equals_recomputation(model):
    tokens = _tokens(160)
    full = np.asarray(model(tokens))
    cache = empty_cache(model.cfg, 1, 256, model.dtype)
    chunk = np.zeros((1, 128), np.int32)
    chunk[0, :100] = tokens[:100]
    logits, cache = prefill_chunk(model, cache, chunk, np.array([100], np.int32))
    assert np.abs(np.asarray(logits) - full[99]).max() < 1e-4
    # A 37-token chunk, padded to 64, attending to the 100 cached tokens plus itself.
    chunk = np.zeros((1, 64), np.int32)
    chunk[0, :37] = tokens[100:137]
    logits, cache = prefill_chunk(model, cache, chunk, np.array([37], np.int32))
    assert np.abs(np.asarray(logits) - full[136]).max() < 1e-4
    assert int(cache.length[0]) == 137 and int(cache.next_pos[0]) == 137
    assert (np.asarray(cache.pos)[:, 0, :, 137:] == -1).all()  # padding left no trace
    more, _ = teacher_forced(model, cache, tokens[None, 137:160])
    assert np.abs(np.asarray(more[0]) - full[137:160]).max() < 1e-4


def test_attention_spans_read_the_filled_prefix_and_change_nothing(model):
    """A prompt chunk and a decode call that attend over the first `span` slots give what attending
    over the whole capacity gives; an inactive row filled past the span keeps every slot."""
    from toyllm_core.serving.cache import KVCache
    from toyllm_core.serving.engine import steps

    def prefilled(n, seed, span=None):
        cache = empty_cache(model.cfg, 1, 600, model.dtype)
        chunk = np.zeros((1, 512), np.int32)
        chunk[0, :n] = _tokens(n, seed)
        return prefill_chunk(model, cache, chunk, np.array([n], np.int32), span=span)

    (lf, full), (ls, spanned) = prefilled(100, 1), prefilled(100, 1, span=512)
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lf), atol=1e-6)
    for a, b in zip(jax.tree.leaves(spanned), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    def decode(span):
        state = KVCache.stack([prefilled(100, 1)[1], prefilled(300, 2)[1]])
        before = jax.tree.map(np.asarray, state)
        inputs = steps.decode_inputs([5, 6], [8, 0], np.zeros((2, 2), np.uint32), [0.0, 0.0], [1, 1], [1.0, 1.0],
                                     [-1, -1], [0, 0])
        state, bundle, _, _ = steps.decode_steps(model, state, np.int32(8), inputs, n_rows=2, max_steps=8, span=span)
        return steps.DecodeOutputs.read(bundle, 8), jax.tree.map(np.asarray, state), before

    (out_full, state_full, _), (out, state, before) = decode(None), decode(256)  # row 0: 100 + 8 slots
    np.testing.assert_array_equal(out.tokens, out_full.tokens)
    np.testing.assert_allclose(out.logprobs[0], out_full.logprobs[0], atol=1e-5)  # (row 1 emits nothing)
    assert out.emitted[0].all() and not out.emitted[1].any() and list(out.remaining) == [0, 0]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(state.k[:, 1], before.k[:, 1])  # the inactive row, 300 slots > span
    np.testing.assert_array_equal(state.pos[:, 1], before.pos[:, 1])


def _greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def _run(model, prompts, policies, params):
    outs: dict[int, list[int]] = {}
    order: dict[int, int] = {}
    for g in generate_tokens(model, prompts, policies, params):
        order.setdefault(id(g.seq), len(order))
        outs.setdefault(order[id(g.seq)], []).append(g.token)
    return [outs[i] for i in range(len(prompts))]


def test_greedy_generation_equals_argmax_of_recomputation(model):
    prompt = _tokens(20, 1).tolist()
    (generated,) = _run(model, [prompt], [FULL], [_greedy(30)])
    forward = jax.jit(model.__call__)
    seq = list(prompt)
    for _ in range(30):  # recompute everything each step; padding after the sequence is causal-masked
        padded = np.zeros(64, np.int32)
        padded[: len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(padded))[len(seq) - 1])))
    assert generated == seq[20:]


def test_batched_decode_of_different_lengths_and_policies_equals_each_alone(model):
    prompts = [_tokens(n, s).tolist() for s, n in enumerate((5, 37, 90, 130, 60))]
    policies = [FULL, make_policy("snapkv"), make_policy("h2o", budget=32, window_size=8),
                make_policy("streaming", budget=48), FULL]
    params = [_greedy(n) for n in (40, 70, 25, 60, 33)]
    together = _run(model, prompts, policies, params)
    for p, c, s, t in zip(prompts, policies, params, together, strict=True):
        (alone,) = _run(model, [p], [c], [s])
        assert alone == t


def test_short_prompts_prefilled_together_generate_what_each_does_alone(model):
    """A batch of short prompts of several classes (their signals recorded for all, each row keeping its
    class's) in one call: the same first tokens, the same continuations, the same compressions later."""
    classes = [CacheClass.make(p, 4, 64, None if p.evicts else 256)
               for p in (FULL, make_policy("snapkv", budget=32, window_size=8), make_policy("h2o", budget=40))]
    prompts = [_tokens(n, 20 + n) for n in (12, 30, 40, 5)]
    picks = [classes[0], classes[1], classes[2], classes[0]]
    lengths = [20, 45, 40, 1]  # the last ends at its first token: an idle cache straight from the batch

    def generate(together: bool):
        engine = Engine(model, classes, steps_per_call=4)
        jobs = [engine.begin(p, c, _greedy(n)) for p, c, n in zip(prompts, picks, lengths, strict=True)]
        assert [j.short for j in jobs] == [True, True, True, True] and all(j.cache is None for j in jobs)
        if together:
            engine.prefill_short(jobs)
        else:
            for j in jobs:
                while not engine.prefill(j):
                    pass
        seqs = [engine.start(j) for j in jobs]
        out = {id(s): [s.pending] for s in seqs}
        while any(s.active for s in seqs):
            for o in engine.step():
                out[id(o.seq)] += o.tokens
        idle, _ = engine.free(seqs[3])
        return [out[id(s)] for s in seqs], [s.compressions for s in seqs], np.asarray(idle.pos)

    (alone, c_alone, idle_alone), (together, c_together, idle_together) = generate(False), generate(True)
    assert together == alone and c_together == c_alone and c_alone[1] > 0 and c_alone[2] > 0
    np.testing.assert_array_equal(idle_together, idle_alone)


def test_due_rows_compress_together_in_one_call_as_each_alone(model, monkeypatch):
    """Rows of a class that reach their trigger at the same step compress in one call (a padded batch
    of slots); each row keeps what it keeps alone, and its cold tier gets its own evicted slots."""
    from toyllm_core.serving.engine import steps

    cls = CacheClass.make(make_policy("snapkv", budget=32, slack=8, window_size=8), 4, 64)
    prompts = [_tokens(20, 40 + i) for i in range(3)]
    calls = []
    compress_rows = steps.compress_rows

    def counted(state, slots, *, cls):
        calls.append(len(slots))
        return compress_rows(state, slots, cls=cls)

    monkeypatch.setattr(steps, "compress_rows", counted)

    def generate(group):
        engine = Engine(model, [cls], steps_per_call=4)
        seqs = [engine.run_prefill(p, cls, _greedy(40)) for p in group]
        out = {id(s): [s.pending] for s in seqs}
        while any(s.active for s in seqs):
            for o in engine.step():
                out[id(o.seq)] += o.tokens
        return [out[id(s)] for s in seqs], [s.cold_tier().pos for s in seqs]

    together, cold_together = generate(prompts)
    batched = list(calls)
    for i, p in enumerate(prompts):
        alone, (cold_alone,) = generate([p])
        assert alone == [together[i]]
        np.testing.assert_array_equal(cold_alone, cold_together[i])
    assert batched and set(batched) == {4}  # three due rows padded to a bucket of 4, every time
    assert len(batched) == len(calls) // 4  # one call for the three, where alone each took its own


def test_rows_join_and_leave_the_slots_without_disturbing_the_others(model):
    classes = {p: CacheClass.make(p, 4, 64, None if p.evicts else 256)
               for p in (FULL, make_policy("snapkv", budget=32), make_policy("h2o", budget=40))}
    engine = Engine(model, list(classes.values()), steps_per_call=4)
    prompts = [_tokens(n, 10 + n).tolist() for n in (12, 50, 70, 33, 20)]
    policies = [FULL, make_policy("snapkv", budget=32), make_policy("h2o", budget=40), FULL, FULL]
    lengths = [60, 50, 45, 30, 25]
    outputs, seqs = {}, {}

    def join(i):
        seqs[i] = engine.run_prefill(prompts[i], classes[policies[i]], _greedy(lengths[i]))
        outputs[i] = [seqs[i].pending]

    for i in (0, 1, 2):
        join(i)
    steps = 0
    while any(s.active for s in seqs.values()):
        for out in engine.step():
            i = next(k for k, s in seqs.items() if s is out.seq)
            outputs[i].extend(out.tokens)
        steps += 1
        if steps == 3:
            join(3)  # a late joiner in the full class, beside row 0
        if steps == 5:
            join(4)
        for s in seqs.values():  # finished rows leave; the last occupied row takes the freed slot
            if s.slot >= 0 and not s.active:
                engine.free(s)
    for i in range(5):
        (alone,) = _run(model, [prompts[i]], [policies[i]], [_greedy(lengths[i])])
        assert outputs[i] == alone, f"row {i}"
    assert engine.running == 0


def test_decode_never_recompiles_for_new_positions(model):
    cache = empty_cache(model.cfg, 2, 256, model.dtype)
    teacher_forced(model, cache, _tokens(8).reshape(2, 4))  # compile
    cache = empty_cache(model.cfg, 2, 256, model.dtype)
    before = jit_stats.compilations()
    for i in range(5):
        _, cache = teacher_forced(model, cache, _tokens(8, i).reshape(2, 4))
    assert jit_stats.compilations() == before
    assert int(cache.length[0]) == 20


def test_bfloat16_greedy_decoding_agrees_with_float32_on_the_shipped_model():
    from toyllm_core import checkpoint as ckpt

    model, _ = ckpt.load("weights/toyllm-base")
    tokens = _tokens(256 + 64, 7) % model.cfg.vocab_size
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        m = model.astype(dtype).for_inference()
        cache = empty_cache(m.cfg, 1, 512, m.dtype)
        out, _ = teacher_forced(m, cache, tokens[None])
        logits[dtype] = np.asarray(out[0, 64:])  # 256 decode steps after a 64-token start
    top32, top16 = logits[jnp.float32].argmax(-1), logits[jnp.bfloat16].argmax(-1)
    agreement = float((top32 == top16).mean())
    diff = float(np.abs(logits[jnp.float32] - logits[jnp.bfloat16]).max())
    # Random tokens leave many near-ties, where rounding may pick the other token; wherever float32's
    # choice is clear, bfloat16 must make the same one. Measured: agreement 0.980, the 5 disagreements
    # all at margins below 0.17, the median margin 1.54.
    top2 = np.sort(logits[jnp.float32], -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 0.5
    print(f"bfloat16 vs float32 on toyllm-base: top-1 agreement {agreement:.4f}, max |logit diff| {diff:.3f}")
    assert clear.mean() >= 0.5 and (top32 == top16)[clear].all()
    assert agreement >= 0.95


def test_smollm2_preset_prefills_and_decodes_at_a_short_context():
    from toyllm_core.config import get_preset
    from toyllm_core.serving.model import ToyLLM

    cfg = get_preset("smollm2-135m")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    model = ToyLLM(cfg, jax.random.PRNGKey(0)).astype(jnp.bfloat16).for_inference()
    cls = CacheClass.make(make_policy("snapkv", budget=32, window_size=8, slack=8), 2, 32, cold_tokens=0)  # one tier
    engine = Engine(model, [cls], steps_per_call=4, batch_rows=2)
    rng = np.random.default_rng(0)
    seqs = [engine.run_prefill(rng.integers(0, cfg.vocab_size, n), cls, _greedy(12)) for n in (40, 70)]
    produced = sum(len(o.tokens) for _ in range(4) for o in engine.step())
    assert produced == 2 * 11 and all(not s.active for s in seqs)
    assert all(s.length <= 32 + 8 for s in seqs) and seqs[1].compressions >= 1


@pytest.mark.parametrize("batch", [1, 3])
def test_the_plain_backend_forms_give_the_numbers_of_the_cpu_forms(monkeypatch, batch):
    """GPUs run the plain forms (bfloat16 stored as it is, one row multiplied as one, one scatter for
    every row's cache write); on CPU they must give what the CPU forms give: a prefill of unequal
    prompts, then decode steps with one row inactive."""
    from toyllm_core.serving import backend
    from toyllm_core.serving.cache import empty_cache

    base = tiny_model().astype(jnp.bfloat16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (batch, 16)).astype(np.int32)
    n_valid = np.array([16, 9, 12][:batch], np.int32)
    steps = rng.integers(0, 1000, (3, batch)).astype(np.int32)

    def run(choice):
        monkeypatch.setattr(backend, "current", lambda: choice)
        model = base.for_inference()
        cache = empty_cache.__wrapped__(model.cfg, batch, 40, jnp.bfloat16)
        forward = jax.jit(lambda m, t, c, n: m.forward(t, c, n))  # a new trace under this choice
        h, cache = forward(model, tokens, cache, n_valid)
        outs = [model.logits(h[:, -1])]
        for i, step in enumerate(steps):
            active = np.ones(batch, np.int32)
            active[-1] = i % 2 if batch > 1 else 1
            h, cache = forward(model, step[:, None], cache, active)
            outs.append(model.logits(h[:, 0]))
        assert cache.k.dtype == (jnp.uint16 if choice.bits_storage else jnp.bfloat16)
        return np.stack(outs), np.asarray(cache.keys(), np.float32), np.asarray(cache.pos)

    cpu, plain = run(backend.CPU), run(backend.PLAIN)
    np.testing.assert_array_equal(cpu[2], plain[2])  # the same slots hold the same positions
    live = cpu[2] >= 0
    np.testing.assert_allclose(cpu[1][live], plain[1][live], atol=1e-2)
    np.testing.assert_allclose(cpu[0], plain[0], atol=2e-2 * np.abs(cpu[0]).max())


@pytest.mark.parametrize("form", ["cpu", "plain"])
def test_a_window_read_and_written_in_place_equals_its_copy(monkeypatch, form):
    """A step on `KVCache.window` (keys and values left whole, read and written in place) leaves the
    cache exactly as the same step on a copy of the window put back (`prefix`, `with_prefix`), under
    both backends' forms: nothing past the window's slots or rows is written, padding included."""
    from toyllm_core.serving import backend
    from toyllm_core.serving.cache import empty_cache

    monkeypatch.setattr(backend, "current", lambda: backend.CPU if form == "cpu" else backend.PLAIN)
    model = tiny_model().astype(jnp.bfloat16).for_inference()
    rng = np.random.default_rng(3)
    state = empty_cache.__wrapped__(model.cfg, 4, 64, jnp.bfloat16, (RecentQueries.want(4),))
    tokens = rng.integers(0, 1000, (3, 8)).astype(np.int32)
    n_valid = np.array([8, 5, 0], np.int32)  # padding, and a row that writes nothing

    def step(cut, put):
        fn = jax.jit(lambda m, c, t, n: put(c, m.forward(t, cut(c), n)[1]))  # a new trace per form
        c = fn(model, state, tokens, n_valid)
        return fn(model, c, tokens[:, :1], np.array([1, 1, 0], np.int32))

    window = step(lambda c: c.window(3, 32), lambda c, part: c.with_window(part))
    copied = step(lambda c: c.prefix(3, 32), lambda c, part: c.with_prefix(part))
    for a, b in zip(jax.tree.leaves(window), jax.tree.leaves(copied), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(np.asarray(window.length)[0]) == 9 and (np.asarray(window.pos)[:, 3] == -1).all()


def test_a_row_written_by_its_prefix_equals_the_row_written_whole(model):
    cfg = model.cfg
    state = empty_cache(cfg, 3, 64, jnp.float32, (RecentQueries.want(4),))
    row = prefill_chunk(model, empty_cache(cfg, 1, 96, jnp.float32, (RecentQueries.want(4),)), _tokens(20)[None],
                        np.array([20], np.int32), span=96)[1]
    whole = state.set_rows(1, row.resized(64))
    part = state.set_row_prefix(1, row.prefix(1, 32))
    for name in ("pos", "length", "next_pos", "signals"):
        jax.tree.map(np.testing.assert_array_equal, getattr(part, name), getattr(whole, name))
    np.testing.assert_array_equal(part.k[:, :, :, :32], whole.k[:, :, :, :32])
    np.testing.assert_array_equal(part.v, whole.v)  # the rest of the row was empty (zeros) in both


def _resident_pages(array) -> int:
    """Pages of array's buffer that are resident (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    start = array.unsafe_buffer_pointer()
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    n = -(-(start + array.nbytes - first) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * n)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(ctypes.c_void_p(first), ctypes.c_size_t(n * mmap.PAGESIZE), vec) == 0
    return sum(b & 1 for b in vec)


def test_a_new_decode_state_holds_no_pages_until_rows_are_written(model):
    """On the host backend a decode state's zeroed keys and values go back to the kernel, and a row
    inserted by its prefix makes only those pages resident."""
    from toyllm_core.serving.backend import release_zero_pages
    from toyllm_core.serving.engine import steps

    cfg, page = model.cfg, 4096
    cls = CacheClass.make(FULL, 8, 64, 4096)
    state = release_zero_pages(empty_cache(cfg, cls.slots, cls.capacity, jnp.float32))
    assert _resident_pages(state.k) <= 2 and _resident_pages(state.v) <= 2  # at most the partial end pages
    row = prefill_chunk(model, empty_cache(cfg, 1, cls.prefill_capacity, jnp.float32), _tokens(20)[None],
                        np.array([20], np.int32), span=256)[1]
    state = steps.insert_row(state, np.int32(3), row, cls=cls, span=256)
    # 256 slots of keys per layer and KV head written (and up to a page either side of each block),
    # where the state holds 8 rows of 4,112.
    blocks = cfg.n_layers * cfg.n_kv_heads
    assert 0 < _resident_pages(state.k) * page <= blocks * (256 * cfg.head_dim * 4 + 2 * page) < state.k.nbytes / 16
    # (Read last: reading untouched pages maps the kernel's zero page, which mincore counts.)
    np.testing.assert_array_equal(np.asarray(state.k[:, 3, :, :256]), np.asarray(row.k[:, 0, :, :256]))
    assert not np.asarray(state.k[:, 3, :, 256:]).any() and not np.asarray(state.k[:, 4]).any()
