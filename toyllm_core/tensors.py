"""The model's weights, listed once: where each sits in a `ToyLLM`, its Hugging Face and GGUF names,
and whether it is a block matmul (what int8 weight-only quantisation converts). Checkpoints, the
GGUF importer and exporter and the quantiser all read this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Weight:
    get: Callable  # ToyLLM -> the array (block weights: stacked, a leading [n_layers] axis)
    hf: str  # HF name (block weights: the suffix after `model.layers.{i}.`)
    gguf: str  # GGUF name (block weights: the stem after `blk.{i}.`, without `.weight`)
    matmul: bool = False  # a block matmul (norm weights are vectors and stay as they are)


GLOBAL = (
    Weight(lambda m: m.embed, "model.embed_tokens.weight", "token_embd"),  # also the output projection (tied)
    Weight(lambda m: m.norm.weight, "model.norm.weight", "output_norm"),
)
BLOCK = (
    Weight(lambda m: m.blocks.attn_norm.weight, "input_layernorm.weight", "attn_norm"),
    Weight(lambda m: m.blocks.attn.wq, "self_attn.q_proj.weight", "attn_q", matmul=True),
    Weight(lambda m: m.blocks.attn.wk, "self_attn.k_proj.weight", "attn_k", matmul=True),
    Weight(lambda m: m.blocks.attn.wv, "self_attn.v_proj.weight", "attn_v", matmul=True),
    Weight(lambda m: m.blocks.attn.wo, "self_attn.o_proj.weight", "attn_output", matmul=True),
    Weight(lambda m: m.blocks.mlp_norm.weight, "post_attention_layernorm.weight", "ffn_norm"),
    Weight(lambda m: m.blocks.mlp.w_gate, "mlp.gate_proj.weight", "ffn_gate", matmul=True),
    Weight(lambda m: m.blocks.mlp.w_up, "mlp.up_proj.weight", "ffn_up", matmul=True),
    Weight(lambda m: m.blocks.mlp.w_down, "mlp.down_proj.weight", "ffn_down", matmul=True),
)
