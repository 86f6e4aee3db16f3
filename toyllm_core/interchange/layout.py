"""How a Llama checkpoint's tensors are named and laid out in GGUF, against the Hugging Face layout.

llama.cpp's converter permutes the rows of each Q and K projection: HF's rotary embedding rotates
the two halves of a head (`rotate_half`), llama.cpp rotates interleaved pairs, so the converter
reorders each head's rows from [half 0 | half 1] into pairs. Importing undoes that; exporting
redoes it.
"""

from __future__ import annotations

import numpy as np

from .. import tensors

# GGUF per-block tensor name -> HF per-layer suffix (without `.weight`), and the global ones.
BLOCK_TENSORS = {w.gguf: w.hf.removesuffix(".weight") for w in tensors.BLOCK}
GLOBAL_TENSORS = {w.gguf: w.hf.removesuffix(".weight") for w in tensors.GLOBAL}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for unknown names."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    if stem in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[stem] + ".weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.weight"
    return None


def gguf_name(hf: str) -> str:
    """The inverse of `hf_name`."""
    for g, h in GLOBAL_TENSORS.items():
        if hf == h + ".weight":
            return g + ".weight"
    _, _, i, rest = hf.split(".", 3)
    for g, h in BLOCK_TENSORS.items():
        if rest == h + ".weight":
            return f"blk.{i}.{g}.weight"
    raise KeyError(hf)


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's interleaved pairs (what llama.cpp's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved pairs -> HF rotate_half row order (inverse of `permute_for_gguf`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_of(hf: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads a tensor's rows are permuted over (None: not permuted)."""
    if hf.endswith("self_attn.q_proj.weight"):
        return n_heads
    if hf.endswith("self_attn.k_proj.weight"):
        return n_kv_heads
    return None
