"""`toyllm export-gguf`: a checkpoint directory -> a GGUF file that llama.cpp runs.

The reverse of the importer, written with the `gguf` library: Llama metadata, the tokenizer (token
list and types; merges, special token ids, BOS policy and chat template through `gguf.SpecialVocab`),
and every tensor under its GGUF name with the Q/K rows permuted back to llama.cpp's layout. Matrices
are stored as F32, F16 or Q8_0; norms stay F32, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..tokenizer import load_tokenizer
from .layout import gguf_name, heads_of, permute_for_gguf

TYPES = ("f32", "f16", "q8_0")


def token_table(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """The GGUF token list and types: special added tokens are CONTROL, other added ones USER_DEFINED,
    and rows of the embedding past the tokenizer are UNUSED padding."""
    from gguf import TokenType

    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    added = tok.added_tokens_decoder
    types = [int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added
             else int(TokenType.NORMAL) for i in range(len(tokens))]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    return tokens, types


def _encode(w: np.ndarray, kind: str):
    """(data, GGML type) of one tensor stored as `kind`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if w.ndim == 1 or kind == "f32":
        return w.astype(np.float32), Q.F32
    if kind == "q8_0" and w.shape[-1] % 32 == 0:  # Q8_0 packs rows in blocks of 32
        return quantize(w.astype(np.float32), Q.Q8_0), Q.Q8_0
    return w.astype(np.float16), Q.F16


def export_gguf(directory: str | Path, out: str | Path, kind: str = "f32", log=lambda msg: None) -> Path:
    import gguf
    from safetensors.numpy import load_file

    if kind not in TYPES:
        raise ValueError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    directory, out = Path(directory), Path(out)
    ckpt.verify(directory)
    cfg, hf = ckpt.read_config(directory)
    tok = load_tokenizer(directory)
    tensors = load_file(str(directory / ckpt.WEIGHTS))
    tensors.pop("lm_head.weight", None)  # tied

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(directory.name)
    w.add_file_type(int(file_type))
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)

    source = hf.get("toyllm", {}).get("imported_from", {})
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(source.get("gguf_tokenizer_pre") or "gpt2")
    tokens, types = token_table(tok, cfg.vocab_size)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=cfg.vocab_size)
    special.add_to_gguf(w)

    for name in ["model.embed_tokens.weight"] + [n for n in sorted(tensors) if n.startswith("model.layers.")] \
            + ["model.norm.weight"]:
        arr = tensors[name]
        heads = heads_of(name, cfg.n_heads, cfg.n_kv_heads)
        data, qtype = _encode(permute_for_gguf(arr, heads) if heads else arr, kind)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype)  # the writer derives the shape from the bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log(f"wrote {out} ({out.stat().st_size:,} bytes, {kind})")
    return out
