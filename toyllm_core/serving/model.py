"""A Llama-family decoder in Equinox: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.

Read top to bottom, smallest parts first. Weights are stored in Hugging Face's `[out_features,
in_features]` layout and RoPE uses its rotate_half convention, so checkpoints are interchangeable
with `transformers.LlamaForCausalLM`.

Depth is data: the blocks are one `Block` whose arrays carry a leading layer axis, run with
`lax.scan`, so a 30-layer model compiles like a 2-layer one. One forward serves every mode:
- `ToyLLM.__call__(tokens)`: the parallel causal forward of one sequence (training, evaluation).
- `ToyLLM.forward(tokens, cache, n_valid)`: a chunk per row (a prompt chunk, or one decode token)
  written into the batched cache, attending to everything cached plus itself, causally.

Dtypes: weights and K/V in the model's dtype (bfloat16 for serving, float32 for tests); the
residual stream, scores, softmax and every matmul accumulator in float32.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import ModelConfig
from . import backend
from .backend import from_bits, to_bits
from .cache import KVCache
from .quant import Int8Weight, int8_linear

# Masked scores: finite, so that a row that sees no key at all (an empty decode slot) stays NaN-free.
_MASKED = float(jnp.finfo(jnp.float32).min)


def _init(key: jax.Array, shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _one_row_safe(dot, x: jax.Array, w: jax.Array) -> jax.Array:
    """dot(x, w) for x [..., in]; a single row computed as two where the backend wants it
    (`backend.pair_one_row`: XLA-CPU's one-row bfloat16 matmul is ~5x slower than two rows)."""
    if backend.pair_one_row(x, w.dtype):
        # (A zero second row: a broadcast copy would be simplified back to one row.)
        pair = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        return dot(pair, w)[:1].reshape(*x.shape[:-1], -1)
    return dot(x, w)


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w [out, in].T in w's dtype, accumulated in float32 -> [..., out] float32 (w may be
    an int8 weight with per-channel scales: quant.Int8Weight)."""
    if isinstance(w, Int8Weight):
        return _one_row_safe(int8_linear, x, w)
    return _one_row_safe(lambda a, b: jax.lax.dot_general(a.astype(b.dtype), b, (((a.ndim - 1,), (1,)), ((), ())),
                                                          preferred_element_type=jnp.float32), x, w)


class RMSNorm(eqx.Module):
    weight: jax.Array  # [d_model]
    eps: float = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        rms = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * rms * self.weight.astype(jnp.float32)


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotate x [B, T, heads, head_dim] (float32) to positions pos [B, T] (HF rotate_half)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = pos.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, half]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_weights(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal softmax attention of grouped queries over keys, with empty slots masked (float32).

    q: [B, kv_heads, group, T, head_dim]; k: [B, kv_heads, S, head_dim]; q_pos: [B, T];
    k_pos: [B, kv_heads, S] (-1 = empty slot). Returns weights [B, kv_heads, group, T, S]. A query
    sees the keys at or before its position.
    """
    if q.shape[3] == 1:
        # Decoding: keys as the left operand of the dot, then the scores transposed so that the
        # softmax reduces along the minor axis: on XLA's CPU backend either other arrangement was
        # several times slower (a strided contraction, or a strided max/sum over S).
        scores = jax.lax.dot_general(k, q.astype(k.dtype), (((3,), (4,)), ((0, 1), (0, 1))),
                                     preferred_element_type=jnp.float32)  # [B, kv, S, g, T]
        scores = scores.transpose(0, 1, 3, 4, 2)  # [B, kv, g, T, S]
    else:
        # A prompt chunk: [T, S] scores straight from the dot. The decode form's transpose of
        # [S, g*T] scores ran inside the mask's loop with a strided read: half of a 2,048-token
        # SmolLM2 prefill (a jax.profiler trace of prefill_chunk).
        scores = jax.lax.dot_general(q.astype(k.dtype), k, (((4,), (3,)), ((0, 1), (0, 1))),
                                     preferred_element_type=jnp.float32)  # [B, kv, g, T, S]
    scores = scores / math.sqrt(q.shape[-1])
    visible = (k_pos[:, :, None, :] >= 0) & (k_pos[:, :, None, :] <= q_pos[:, None, :, None])  # [B, kv, T, S]
    scores = jnp.where(visible[:, :, None], scores, _MASKED)
    return jax.nn.softmax(scores, axis=-1)


class Attention(eqx.Module):
    wq: jax.Array  # [heads * head_dim, d_model]
    wk: jax.Array  # [kv_heads * head_dim, d_model]
    wv: jax.Array  # [kv_heads * head_dim, d_model]
    wo: jax.Array  # [d_model, heads * head_dim]
    cfg: ModelConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        kq, kk, kv, ko = jax.random.split(key, 4)
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = _init(kq, (cfg.n_heads * hd, d))
        self.wk = _init(kk, (cfg.n_kv_heads * hd, d))
        self.wv = _init(kv, (cfg.n_kv_heads * hd, d))
        # Residual projections scaled down with depth (GPT-2) so the residual stream starts tame.
        self.wo = _init(ko, (d, cfg.n_heads * hd), 0.02 / math.sqrt(2 * cfg.n_layers))
        self.cfg = cfg

    def project(self, x: jax.Array, pos: jax.Array):
        """x [B, T, d] at positions pos [B, T] -> q [B, T, heads, hd], k and v [B, T, kv_heads, hd]
        in the weights' dtype, RoPE applied."""
        c = self.cfg
        b, t = x.shape[:2]
        q = linear(x, self.wq).reshape(b, t, c.n_heads, c.head_dim)
        k = linear(x, self.wk).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = linear(x, self.wv).reshape(b, t, c.n_kv_heads, c.head_dim)
        dtype = self.wq.dtype
        return (rope(q, pos, c.rope_theta).astype(dtype), rope(k, pos, c.rope_theta).astype(dtype),
                v.astype(dtype))

    def attend(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, k_pos: jax.Array):
        """q [B, T, heads, hd] over k, v [B, kv_heads, S, hd] -> (output [B, T, d] float32,
        weights [B, kv, group, T, S] float32)."""
        c = self.cfg
        b, t = q.shape[:2]
        q = q.reshape(b, t, c.n_kv_heads, c.group_size, c.head_dim).transpose(0, 2, 3, 1, 4)  # [B, kv, g, T, hd]
        dtype = backend.attention_dtype(k.dtype, t)  # float32 when decoding on CPU
        k, v = k.astype(dtype), v.astype(dtype)
        weights = attention_weights(q, k, q_pos, k_pos)
        out = jax.lax.dot_general(weights.astype(v.dtype), v, (((4,), (2,)), ((0, 1), (0, 1))),
                                  preferred_element_type=jnp.float32)  # [B, kv, g, T, hd]
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.n_heads * c.head_dim)
        return linear(out, self.wo), weights


class MLP(eqx.Module):
    w_gate: jax.Array  # [d_ff, d_model]
    w_up: jax.Array  # [d_ff, d_model]
    w_down: jax.Array  # [d_model, d_ff]

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        kg, ku, kd = jax.random.split(key, 3)
        self.w_gate = _init(kg, (cfg.d_ff, cfg.d_model))
        self.w_up = _init(ku, (cfg.d_ff, cfg.d_model))
        self.w_down = _init(kd, (cfg.d_model, cfg.d_ff), 0.02 / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(jax.nn.silu(linear(x, self.w_gate)) * linear(x, self.w_up), self.w_down)


class Block(eqx.Module):
    """One decoder layer. Inside `ToyLLM` its arrays carry a leading layer axis (all layers stacked);
    `lax.scan` hands each step one layer's slice."""

    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: MLP

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        ka, km = jax.random.split(key)
        self.attn_norm = RMSNorm(jnp.ones(cfg.d_model), cfg.norm_eps)
        self.attn = Attention(cfg, ka)
        self.mlp_norm = RMSNorm(jnp.ones(cfg.d_model), cfg.norm_eps)
        self.mlp = MLP(cfg, km)

    def __call__(self, x: jax.Array, pos: jax.Array, valid: jax.Array, cache: KVCache | None, layer):
        """x [B, T, d] float32 at positions pos [B, T] (valid [B, T]: real tokens, not padding).

        Without a cache: causal self-attention over the chunk. With one: the chunk's keys and values
        go into the cache's slots first (in place: the cache is carried through the scan and
        donated), then the chunk attends over the whole layer, and the layer's policy signals are
        recorded if the cache carries them. Returns (x, cache).
        """
        q, k, v = self.attn.project(self.attn_norm(x), pos)
        if cache is None:
            k_pos = jnp.broadcast_to(pos[:, None, :], (pos.shape[0], k.shape[2], pos.shape[1]))  # [B, kv, T]
            out, _ = self.attn.attend(q, pos, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), k_pos)
        else:
            cache = cache.write(layer, k, v, jnp.where(valid, pos, -1))
            keys, values, k_pos = cache.layer(layer)
            out, weights = self.attn.attend(q, pos, keys, values, k_pos)
            cache = cache.observe(layer, q, weights, pos, valid)
        x = x + out
        return x + self.mlp(self.mlp_norm(x)), cache


class ToyLLM(eqx.Module):
    embed: jax.Array  # [vocab, d_model], also the output projection (tied)
    blocks: Block  # every array with a leading [n_layers] axis
    norm: RMSNorm
    cfg: ModelConfig = eqx.field(static=True)
    # Inference only (see for_inference): the embedding as bfloat16 bits, for the token lookup.
    embed_bits: jax.Array | None = None

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        ke, kb = jax.random.split(key)
        self.embed = _init(ke, (cfg.vocab_size, cfg.d_model))
        self.blocks = eqx.filter_vmap(lambda k: Block(cfg, k))(jax.random.split(kb, cfg.n_layers))
        self.norm = RMSNorm(jnp.ones(cfg.d_model), cfg.norm_eps)
        self.cfg = cfg
        self.embed_bits = None

    @property
    def dtype(self):
        return self.embed.dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes of every array the model holds (its weights in memory, inference copies included)."""
        return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(self, eqx.is_array)))

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes per token under this model's dtype (keys + values, every layer)."""
        return self.cfg.kv_bytes_per_token(self.dtype)

    def astype(self, dtype) -> ToyLLM:
        """The same model with every weight stored as `dtype` (bfloat16 for serving)."""
        return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, self)

    def for_inference(self) -> ToyLLM:
        """This model laid out for the jitted serving steps. On XLA's CPU backend a bfloat16 array
        that a step converts or gathers from is converted whole, once per call (hoisted out of the
        decode loop): the blocks' weights to their bits for the scan (212 MB for SmolLM2-135M), the
        embedding to float32 for the token lookup (113 MB), ~10 ms per decode step at 16 steps per
        call and ~40 at 4 (a jax.profiler trace of decode_steps). So the blocks are stored as their
        bits, and a bfloat16 model keeps a second copy of the embedding as bits to look tokens up in
        (vocab x d_model more memory). Not for training (the copies would not follow the weights)."""
        blocks = jax.tree.map(to_bits, self.blocks)
        bits = to_bits(self.embed) if backend.current().bits_storage and self.embed.dtype == jnp.bfloat16 else None
        model = eqx.tree_at(lambda m: m.blocks, self, blocks)
        return eqx.tree_at(lambda m: m.embed_bits, model, bits, is_leaf=lambda x: x is None)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and the tied output projection: h [..., d] -> [..., vocab] float32."""
        # Tying the output projection to the embedding saves vocab x d_model parameters, most of a
        # small model's weights.
        x = self.norm(h).astype(self.dtype)
        flat = x.reshape(-1, x.shape[-1])
        # [vocab, d] @ [d, N], the embedding as the left operand, read where it is: the fastest form
        # on XLA's CPU backend for 1 to 32 rows (a contiguous transposed copy as the right operand was
        # 1.2-1.8x slower; x @ embed.T copies the transposed table on every call).
        out = _one_row_safe(lambda a, e: jax.lax.dot_general(e, a, (((1,), (1,)), ((), ())),
                                                             preferred_element_type=jnp.float32).T, flat, self.embed)
        return out.reshape(*x.shape[:-1], self.embed.shape[0])

    def embedding(self, tokens: jax.Array) -> jax.Array:
        """The rows of tokens [...] -> [..., d] float32 (looked up in the bits when there are some)."""
        if self.embed_bits is not None:
            return from_bits(self.embed_bits[tokens]).astype(jnp.float32)
        return self.embed[tokens].astype(jnp.float32)

    def forward(self, tokens: jax.Array, cache: KVCache | None = None,
                n_valid: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Run tokens [B, T] through every layer -> (hidden states [B, T, d] float32, cache).

        Without a cache, row b holds positions 0..T-1. With one, its first n_valid[b] tokens are real
        (the rest padding, written with position -1 so that nothing sees them) and go to slots
        length[b].. and positions next_pos[b].. of the cache; the caller guarantees the room.
        """
        b, t = tokens.shape
        offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
        if cache is None:
            pos = jnp.broadcast_to(offsets, (b, t))
            valid = jnp.ones((b, t), bool)
        else:
            pos = cache.next_pos[:, None] + offsets  # [B, T]
            valid = offsets < n_valid[:, None]
        x = self.embedding(tokens)
        params, static = eqx.partition(self.blocks, eqx.is_array)
        # The scan slices one layer's weights per step: as bits for bfloat16 (see backend.to_bits;
        # a no-op for the inference layout, which stores them so).
        params = jax.tree.map(to_bits, params)

        def layer_step(carry, xs):
            x, cache = carry
            layer_params, layer = xs
            block = eqx.combine(jax.tree.map(from_bits, layer_params), static)
            return block(x, pos, valid, cache, layer), None

        layers = jnp.arange(self.cfg.n_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(layer_step, (x, cache), (params, layers))
        if cache is not None:
            cache = cache.advance(n_valid, pos, valid)
        return x, cache

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Parallel causal forward of one sequence tokens [T] -> hidden states [T, d]."""
        return self.forward(tokens[None])[0][0]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits [T, vocab] for tokens [T] (training, evaluation, reference for the cache)."""
        return self.logits(self.hidden(tokens))
