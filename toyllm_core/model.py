"""A Llama-family decoder in Equinox: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.

Read top to bottom, smallest parts first. Every module works on one sequence; callers `vmap` over
the batch. Weights are stored in Hugging Face's `[out_features, in_features]` layout and RoPE uses
its rotate_half convention, so checkpoints are interchangeable with `transformers.LlamaForCausalLM`.

Two modes share the weights:
- `ToyLLM.__call__(tokens)`: the parallel causal forward used by training.
- `ToyLLM.extend(tokens, n_valid, cache)`: a chunk of tokens (a prompt chunk, or a single decode
  token) written into the cache and attending to everything cached plus itself, causally.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .cache import RECENT_QUERIES, KVCache
from .config import ModelConfig


def _init(key: jax.Array, shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class RMSNorm(eqx.Module):
    weight: jax.Array  # [d_model]
    eps: float = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        rms = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * rms * self.weight


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotate x [T, heads, head_dim] to positions pos [T] (HF rotate_half over the two halves)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = pos.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, half]
    cos = jnp.cos(angles)[:, None, :]  # [T, 1, half]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_weights(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal softmax attention of grouped queries over keys, with empty slots masked.

    q: [kv_heads, group, T, head_dim]; k: [kv_heads, S, head_dim]; q_pos: [T]; k_pos: [kv_heads, S]
    (-1 = empty slot). Returns weights [kv_heads, group, T, S]. A query sees the keys at or before
    its position; callers make sure each query sees at least one key.
    """
    # Keys as the left operand of the dot, then the scores transposed so that the softmax reduces
    # along the minor axis: on XLA's CPU backend, at decode (T = 1), either other arrangement was
    # several times slower (a strided contraction, or a strided max/sum over S).
    scores = jax.lax.dot_general(k, q, (((2,), (3,)), ((0,), (0,))))  # [kv, S, g, T]
    scores = scores.transpose(0, 2, 3, 1) / math.sqrt(q.shape[-1])  # [kv, g, T, S]
    visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[None, :, None])  # [kv, T, S]
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
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
        """x [T, d] at positions pos [T] -> q [T, heads, hd], k and v [T, kv_heads, hd], RoPE applied."""
        c = self.cfg
        t = x.shape[0]
        q = (x @ self.wq.T).reshape(t, c.n_heads, c.head_dim)
        k = (x @ self.wk.T).reshape(t, c.n_kv_heads, c.head_dim)
        v = (x @ self.wv.T).reshape(t, c.n_kv_heads, c.head_dim)
        return rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta), v

    def attend(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, k_pos: jax.Array):
        """q [T, heads, hd] over k, v [kv_heads, S, hd] -> (output [T, d], weights [kv, group, T, S])."""
        c = self.cfg
        t = q.shape[0]
        q = q.reshape(t, c.n_kv_heads, c.group_size, c.head_dim).transpose(1, 2, 0, 3)  # [kv, g, T, hd]
        weights = attention_weights(q, k, q_pos, k_pos)
        out = jax.lax.dot_general(weights, v, (((3,), (1,)), ((0,), (0,))))  # [kv, g, T, hd]
        out = out.transpose(2, 0, 1, 3).reshape(t, c.n_heads * c.head_dim)
        return out @ self.wo.T, weights

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """Parallel causal self-attention over x [T, d] (no cache)."""
        q, k, v = self.project(x, pos)
        k_pos = jnp.broadcast_to(pos, (self.cfg.n_kv_heads, pos.shape[0]))
        out, _ = self.attend(q, pos, k.transpose(1, 0, 2), v.transpose(1, 0, 2), k_pos)
        return out


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
        return (jax.nn.silu(x @ self.w_gate.T) * (x @ self.w_up.T)) @ self.w_down.T


class Block(eqx.Module):
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

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), pos)
        return x + self.mlp(self.mlp_norm(x))


class ToyLLM(eqx.Module):
    embed: jax.Array  # [vocab, d_model], also the output projection (tied)
    blocks: tuple[Block, ...]
    norm: RMSNorm
    cfg: ModelConfig = eqx.field(static=True)
    # Inference only (see for_inference): the embedding transposed, contiguous [d_model, vocab].
    unembed: jax.Array | None = None

    def __init__(self, cfg: ModelConfig, key: jax.Array):
        ke, *kb = jax.random.split(key, cfg.n_layers + 1)
        self.embed = _init(ke, (cfg.vocab_size, cfg.d_model))
        self.blocks = tuple(Block(cfg, k) for k in kb)
        self.norm = RMSNorm(jnp.ones(cfg.d_model), cfg.norm_eps)
        self.cfg = cfg
        self.unembed = None

    def for_inference(self) -> ToyLLM:
        """This model plus a contiguous [d_model, vocab] copy of the tied embedding, for one-row
        logits. XLA's CPU backend computes [1, d] @ embed.T by copying the transposed 50257 x 128
        matrix in a loop fusion on every call, most of a batch-1 decode step; with the copy made once
        the product is a plain matrix-vector one (benchmarks/lm_head.py). Costs vocab x d_model floats
        more memory; not for training (the copy would not follow the embedding)."""
        transposed = jnp.asarray(np.ascontiguousarray(np.asarray(self.embed).T))
        return eqx.tree_at(lambda m: m.unembed, self, transposed, is_leaf=lambda x: x is None)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and the tied output projection: h [..., d] -> [..., vocab]."""
        # Tying the output projection to the embedding saves vocab x d_model parameters, most of a
        # small model's weights.
        x = self.norm(h)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1:
            # One row (batch-1 decoding): [1, d] @ [d, vocab] is the fastest form on XLA's CPU
            # backend, by far with a contiguous [d, vocab] matrix (for_inference); for two or more
            # rows the next form is (benchmarks/lm_head.py).
            out = flat @ (self.embed.T if self.unembed is None else self.unembed)
        else:
            # Several rows: [vocab, d] @ [d, N] measured 1.2-1.7x faster in the decode step.
            out = (self.embed @ flat.T).T
        return out.reshape(*x.shape[:-1], self.embed.shape[0])

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Parallel causal forward of tokens [T] at positions 0..T-1 -> hidden states [T, d]."""
        pos = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        x = self.embed[tokens]
        for block in self.blocks:
            x = block(x, pos)
        return x

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits [T, vocab] for tokens [T] (training, evaluation, reference for the cache)."""
        return self.logits(self.hidden(tokens))

    def extend(self, tokens: jax.Array, n_valid: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append tokens [C] (the first n_valid real, the rest padding) to the cache and run them.

        Each token is written into the cache before attention, at slot cache.length + i and
        position cache.next_pos + i, then attends to every cached key at or before its position.
        Padding tokens are written too (the chunk shape is static) but get position -1, so nothing
        ever sees them and later writes reuse their slots. Returns hidden states [C, d] and the cache.
        The caller guarantees cache.length + C <= capacity.
        """
        c = self.cfg
        chunk = tokens.shape[0]
        offsets = jnp.arange(chunk, dtype=jnp.int32)
        valid = offsets < n_valid  # [C]
        pos = cache.next_pos + offsets  # [C]
        slot_pos = jnp.where(valid, pos, -1)  # [C]
        start = cache.length

        # The last RECENT_QUERIES real queries go to the ring buffer at slot pos % R; the rest to an
        # out-of-range slot that the scatter drops.
        remembered = valid & (offsets >= n_valid - RECENT_QUERIES)
        ring_slot = jnp.where(remembered, pos % RECENT_QUERIES, RECENT_QUERIES)
        recent_pos = cache.recent_pos.at[ring_slot].set(pos, mode="drop")

        k_cache, v_cache, pos_cache = cache.k, cache.v, cache.pos
        score, recent_q = cache.score, cache.recent_q
        slot_pos_kv = jnp.broadcast_to(slot_pos, (c.n_kv_heads, chunk))[None]  # [1, kv, C]
        x = self.embed[tokens]
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.project(block.attn_norm(x), pos)
            # Write this chunk's keys and values first (in place: the cache is donated), then
            # attend over the whole cache.
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(1, 0, 2)[None], (layer, 0, start, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(1, 0, 2)[None], (layer, 0, start, 0))
            pos_cache = jax.lax.dynamic_update_slice(pos_cache, slot_pos_kv, (layer, 0, start))
            out, weights = block.attn.attend(q, pos, k_cache[layer], v_cache[layer], pos_cache[layer])
            x = x + out
            x = x + block.mlp(block.mlp_norm(x))

            # Attention each key received from this chunk's real queries, summed over the query
            # heads of its KV group: H2O's accumulated score.
            received = jnp.einsum("kgts,t->ks", weights, valid.astype(jnp.float32))
            score = score.at[layer].add(received)
            # (Mixed indexing puts the ring axis first: the update is [C, heads, hd], which q already is.)
            recent_q = recent_q.at[layer, :, ring_slot].set(q, mode="drop")

        new_cache = KVCache(
            k=k_cache,
            v=v_cache,
            pos=pos_cache,
            score=score,
            recent_q=recent_q,
            recent_pos=recent_pos,
            length=cache.length + n_valid,
            next_pos=cache.next_pos + n_valid,
        )
        return x, new_cache
