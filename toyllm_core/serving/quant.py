"""Weight-only int8: every matmul weight of the decoder blocks as int8 with one float32 scale per
output channel (symmetric: w ~= q * scale, |q| <= 127). Activations stay in the model's dtype and
every product is accumulated in float32; the scale multiplies the output columns, so the
dequantised weight is never formed in memory.

The norms and the tied embedding stay as they were: the embedding is both the token lookup and the
output projection, and an int8 one would be converted whole on every decode call (XLA's CPU backend
hoists a loop-invariant conversion out of the decode loop; see `ToyLLM.for_inference`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import tensors

QMAX = 127


class Int8Weight(eqx.Module):
    """A weight [..., out, in] as q int8 and scale float32 [..., out] (leading axes: stacked layers)."""

    q: jax.Array
    scale: jax.Array
    compute_dtype: str = eqx.field(static=True, default="bfloat16")

    @property
    def dtype(self):
        """The dtype the products are taken in (what a plain weight's dtype says elsewhere)."""
        return jnp.dtype(self.compute_dtype)

    def dequantize(self) -> jax.Array:
        """The weight this stands for, float32 (for references and tests)."""
        return self.q.astype(jnp.float32) * self.scale[..., None]


def quantize(w: jax.Array, compute_dtype=None) -> Int8Weight:
    """Round w [..., out, in] to int8 per output channel (the row's largest magnitude maps to 127)."""
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-1)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w32 / scale[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return Int8Weight(q, scale.astype(jnp.float32), jnp.dtype(compute_dtype or w.dtype).name)


def int8_linear(x: jax.Array, w: Int8Weight) -> jax.Array:
    """x [..., in] @ dequantize(w).T -> [..., out] float32: int8 values are exact in bfloat16, so the
    product is the int8 matmul accumulated in float32, then scaled per output column."""
    dt = w.dtype
    out = jax.lax.dot_general(x.astype(dt), w.q.astype(dt), (((x.ndim - 1,), (w.q.ndim - 1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return out * w.scale


def quantize_int8(model):
    """The model with every block matmul weight as an `Int8Weight` (products in the model's dtype)."""
    for w in tensors.BLOCK:
        if w.matmul:
            model = eqx.tree_at(w.get, model, quantize(w.get(model), model.dtype))
    return model


def is_quantized(model) -> bool:
    return isinstance(model.blocks.attn.wq, Int8Weight)


QUANTIZATIONS = ("none", "int8")


def check(quantization: str) -> str:
    """The name if it is a known quantization; a clear error otherwise."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def apply(model, quantization: str):
    """`model` under a named quantization ("none" or "int8")."""
    return quantize_int8(model) if check(quantization) == "int8" else model
