"""Weight-only int8 (toyllm_core.serving.quant): the rounding, the int8 matmul against a float reference,
and a quantized model through every path the server uses (cached equals recomputed, batched equals
alone, no compile after warm-up)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model

from toyllm_core import jit_stats
from toyllm_core.lab.verify import cached_vs_recomputed
from toyllm_core.serving.engine import CacheClass, Engine
from toyllm_core.serving.engine.programs import warm_up
from toyllm_core.serving.policies import make_policy
from toyllm_core.serving.quant import (
    QMAX,
    Int8Weight,
    apply,
    int8_linear,
    is_quantized,
    quantize,
    quantize_int8,
)
from toyllm_core.serving.sampling import SamplingParams


def test_rounding_is_per_output_channel_and_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 40)).astype(np.float32) * np.array([0.01, 0.1, 1, 3, 10, 0.5])[:, None]
    w[5] = 0.0  # an all-zero row keeps a finite scale
    qw = quantize(jnp.asarray(w))
    q, scale = np.asarray(qw.q), np.asarray(qw.scale)
    assert q.dtype == np.int8 and scale.shape == (6,) and np.all(np.abs(q) <= QMAX)
    np.testing.assert_allclose(scale[:5], np.abs(w[:5]).max(1) / QMAX, rtol=1e-6)
    assert scale[5] == 1.0 and not q[5].any()
    assert np.all(np.abs(q[:5]).max(1) == QMAX)  # each row's largest magnitude maps to 127
    err = np.abs(np.asarray(qw.dequantize()) - w)
    assert np.all(err <= scale[:, None] / 2 + 1e-7)


def test_stacked_weights_quantize_per_layer_and_channel():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 16)), jnp.float32)
    qw = quantize(w)
    assert qw.q.shape == (3, 8, 16) and qw.scale.shape == (3, 8)
    for layer in range(3):
        np.testing.assert_array_equal(np.asarray(qw.q[layer]), np.asarray(quantize(w[layer]).q))


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_matmul_equals_the_dequantised_float_product(compute, rows):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 64)).astype(np.float32) * 0.1
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    qw = quantize(jnp.asarray(w), compute)
    got = np.asarray(int8_linear(jnp.asarray(x), qw))
    # Reference in float64: x rounded to the compute dtype (as the product takes it), int8 values exact.
    xr = np.asarray(jnp.asarray(x).astype(compute).astype(jnp.float32), np.float64)
    want = (xr @ np.asarray(qw.q, np.float64).T) * np.asarray(qw.scale, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _dequantised(model):
    """The same model with each int8 weight replaced by its float32 dequantisation."""
    return jax.tree.map(lambda w: w.dequantize() if isinstance(w, Int8Weight) else w, model,
                        is_leaf=lambda w: isinstance(w, Int8Weight))


def test_quantized_model_computes_with_its_dequantised_weights():
    model = tiny_model(2, seed=4)
    q = quantize_int8(model)
    assert is_quantized(q) and not is_quantized(model)
    assert q.blocks.mlp.w_up.q.shape == model.blocks.mlp.w_up.shape  # stacked [layers, out, in]
    assert q.weight_bytes < model.weight_bytes
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, model.cfg.vocab_size, 40), jnp.int32)
    np.testing.assert_allclose(np.asarray(q(tokens)), np.asarray(_dequantised(q)(tokens)), rtol=1e-4, atol=1e-4)
    # ...and stays close to the float model it came from.
    assert float(np.abs(np.asarray(q(tokens)) - np.asarray(model(tokens))).max()) < 0.05


def test_quantized_cached_decode_equals_recomputation():
    q = quantize_int8(tiny_model(2, seed=6)).for_inference()
    assert cached_vs_recomputed(q, length=80).cached_vs_recomputed < 1e-4


def test_quantized_bfloat16_model_batched_equals_alone_and_nothing_compiles_after_warm_up():
    model = quantize_int8(tiny_model(2, seed=7).astype(jnp.bfloat16)).for_inference()
    assert model.blocks.attn.wq.dtype == jnp.bfloat16 and model.blocks.attn.wq.q.dtype == jnp.int8
    # One tier and batches of up to 4 prompts: the int8 model's programs, not every kind again.
    cls = CacheClass.make(make_policy("snapkv", budget=32, window_size=8, slack=8), 3, 32, cold_tokens=0)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, model.cfg.vocab_size, n) for n in (20, 45, 70)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)

    def run(batch):
        engine = Engine(model, [cls], steps_per_call=4, batch_rows=4)
        seqs = [engine.run_prefill(p, cls, params) for p in batch]
        out = {id(s): [] for s in seqs}
        while any(s.active for s in seqs):
            for o in engine.step():
                out[id(o.seq)].extend(o.tokens)
        return [out[id(s)] for s in seqs]

    warm_up(model, [cls], 4, log=lambda msg: None, batch_rows=4)
    before = jit_stats.compilations()
    together = run(prompts)
    alone = [run([p])[0] for p in prompts]
    assert together == alone and all(len(t) == 11 for t in together)  # the first token comes from the prefill
    assert jit_stats.compilations() == before  # the warm-up compiled every program the int8 model runs


def test_unknown_quantization_is_a_clear_error():
    model = tiny_model()
    assert apply(model, "none") is model
    with pytest.raises(ValueError, match="quantization 'int4'"):
        apply(model, "int4")
    assert eqx.tree_equal(apply(model, "int8"), quantize_int8(model))
