"""`toyllm import-gguf`: a Llama-architecture GGUF file -> a checkpoint directory.

The `gguf` library reads the file and dequantises every tensor to float32; the Q/K rows are put back
in the HF rotate_half order (see `layout`); transformers' GGUF converter builds the tokenizer, which
is then corrected and checked against the file's own metadata (the authority): BOS and EOS ids,
whether BOS is added, which tokens are special, and that decoding gives back text with spaces before
punctuation untouched.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..checkpoint import save_tensors, sha256_of, write_checksums
from ..config import ModelConfig
from .layout import heads_of, hf_name, unpermute_from_gguf


class GGUFImportError(ValueError):
    """A GGUF file this project cannot import; the message says why."""


CONTROL = 3  # gguf.TokenType.CONTROL, the type of special tokens


class Metadata:
    """The key-value fields of a GGUF file, as Python values."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"the GGUF metadata has no {key!r}")
        return value


def config_from_gguf(meta: Metadata, vocab_rows: int) -> ModelConfig:
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"architecture {arch!r} is not supported; only Llama-architecture GGUFs import")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFImportError(f"RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    d_model = int(meta.require("llama.embedding_length"))
    n_heads = int(meta.require("llama.attention.head_count"))
    rope_dim = meta.get("llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != d_model // n_heads:
        raise GGUFImportError(f"rope.dimension_count {rope_dim} != head dimension {d_model // n_heads}: "
                              "partial rotary embeddings are not supported")
    return ModelConfig(
        vocab_size=int(meta.get("llama.vocab_size", vocab_rows)),
        context_length=int(meta.require("llama.context_length")),
        d_model=d_model,
        n_layers=int(meta.require("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        d_ff=int(meta.require("llama.feed_forward_length")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        # float32 in the file: round to the decimal it was written from (9.99999974e-06 -> 1e-05).
        norm_eps=float(np.format_float_positional(np.float32(meta.require("llama.attention.layer_norm_rms_epsilon")),
                                                  unique=True)),
        eos_token_id=int(meta.require("tokenizer.ggml.eos_token_id")),
    )


def read_tensors(reader, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], Counter]:
    """HF-named float32 tensors (Q/K rows un-permuted) and a count of the file's tensor types."""
    from gguf.quants import dequantize

    tensors, types, output = {}, Counter(), None
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        types[t.tensor_type.name] += 1
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        if t.name == "output.weight":
            output = w
            continue
        name = hf_name(t.name)
        if name is None:
            if t.name.endswith("rope_freqs.weight"):
                raise GGUFImportError(f"{t.name}: RoPE frequency factors are not supported")
            continue  # e.g. llama.cpp's precomputed rope tables: derived, not weights
        heads = heads_of(name, cfg.n_heads, cfg.n_kv_heads)
        tensors[name] = unpermute_from_gguf(w, heads) if heads else w
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise GGUFImportError("the file has no token_embd.weight")
    if output is not None and not np.allclose(output, embed, atol=1e-2):
        raise GGUFImportError("the file has a separate output projection (output.weight); this project's "
                              "models tie it to the token embedding, so it cannot be imported")
    return tensors, types


# transformers' GGUF metadata reader imports torch, which serving never installs; the metadata is read
# here with the `gguf` library instead and handed to transformers' converter, as its own loader does.
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def convert_tokenizer(meta: Metadata, context_length: int):
    """transformers' GGUF tokenizer converter, then corrected to the file's metadata."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFImportError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
                              "(only GPT-2-style byte-level BPE, 'gpt2')")
    tokens = meta.require("tokenizer.ggml.tokens")
    groups = {group: {name: meta.get(f"tokenizer.{key}") for key, name in renames.items()
                      if meta.get(f"tokenizer.{key}") is not None}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    config = groups["tokenizer_config"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokens[int(token_id)]
    backend, extra = convert_gguf_tokenizer(meta.require("general.architecture"), groups["tokenizer"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), int(meta.require("tokenizer.ggml.eos_token_id"))
    tok.eos_token = tokens[eos]
    if bos is not None:
        tok.bos_token = tokens[int(bos)]
    # BOS is added exactly when the file says so (the converter's default may differ).
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[int(bos)]
        processor = TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, int(bos))])
    else:
        processor = TemplateProcessing(single="$A", pair="$A $B")
    tok.backend_tokenizer.post_processor = processor
    tok.clean_up_tokenization_spaces = False  # decode must give back " ," as " ,"
    tok.model_max_length = context_length
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tok.chat_template = template
    return tok


def check_tokenizer(tok, meta: Metadata) -> None:
    """The tokenizer agrees with the GGUF metadata; GGUFImportError naming the first disagreement."""
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    problems = []
    if len(tok) != len(tokens):
        problems.append(f"{len(tok)} tokens, the file lists {len(tokens)}")
    elif tok.convert_ids_to_tokens(list(range(len(tokens)))) != list(tokens):
        problems.append("token strings differ from the file's token list")
    if tok.eos_token_id != meta.get("tokenizer.ggml.eos_token_id"):
        problems.append(f"EOS id {tok.eos_token_id}, the file says {meta.get('tokenizer.ggml.eos_token_id')}")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None and tok.bos_token_id != bos:
        problems.append(f"BOS id {tok.bos_token_id}, the file says {bos}")
    ids = tok("Hello").input_ids
    adds_bos = bos is not None and ids[:1] == [bos]
    if adds_bos != bool(meta.get("tokenizer.ggml.add_bos_token", False)):
        problems.append(f"adds BOS: {adds_bos}, the file says {meta.get('tokenizer.ggml.add_bos_token', False)}")
    if types is not None:
        control = {i for i, t in enumerate(types) if t == CONTROL}
        special = set(tok.all_special_ids) | {i for i, a in tok.added_tokens_decoder.items() if a.special}
        if special != control:
            problems.append(f"special tokens {sorted(special - control)[:5]} are not control tokens in the file, "
                            f"or control tokens {sorted(control - special)[:5]} are not special")
    text = "Hello , world ! It 's  two  spaces ;\nand a new line ."
    if tok.decode(tok(text, add_special_tokens=False).input_ids) != text:
        problems.append("decoding does not give back the encoded text")
    if problems:
        raise GGUFImportError("the converted tokenizer disagrees with the GGUF metadata: " + "; ".join(problems))


def model_card(path: Path, sha: str, meta: Metadata, cfg: ModelConfig, types: Counter, source: dict | None) -> str:
    name = meta.get("general.name", path.stem)
    about = ("Imported from GGUF with `toyllm import-gguf`: every tensor dequantised to float32, Q/K rows "
             "returned to the Hugging Face rotate_half layout, tokenizer converted by transformers and checked "
             "against the file's metadata.")
    lines = [f"# {name}", "", about, "", "## Provenance", "",
             f"- source file: `{path.name}`, {path.stat().st_size:,} bytes, sha256 `{sha}`"]
    if source:
        lines += [f"- {k}: {v}" for k, v in source.items()]
    for key in ("general.organization", "general.basename", "general.finetune", "general.size_label"):
        if meta.get(key) is not None:
            lines.append(f"- {key.split('.', 1)[1]}: {meta.get(key)}")
    lines += [f"- licence: {meta.get('general.license', 'not stated in the file')}",
              f"- tensor types in the file: {', '.join(f'{k} x{v}' for k, v in sorted(types.items()))}",
              "", "## Model", "",
              (f"Llama architecture, {cfg.num_params():,} parameters: {cfg.n_layers} layers, d_model {cfg.d_model}, "
               f"{cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, d_ff {cfg.d_ff}, vocabulary {cfg.vocab_size}, "
               f"context {cfg.context_length}, rope_theta {cfg.rope_theta:g}, RMSNorm eps {cfg.norm_eps:g}, "
               "tied embeddings."), "",
              "The weights are the file's quantised values, dequantised: they carry its quantisation error.", ""]
    return "\n".join(lines)


def import_gguf(path: str | Path, out: str | Path, source: dict | None = None, extra_files: dict | None = None,
                log=lambda msg: None) -> Path:
    """Import `path` into the checkpoint directory `out` (written aside, then moved into place);
    `extra_files` ({name: bytes}, e.g. the licence) go in beside it, under the checksums."""
    from gguf import GGUFReader

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    started = time.perf_counter()
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise GGUFImportError(f"{path}: not a readable GGUF file ({e})") from None
    meta = Metadata(reader)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    cfg = config_from_gguf(meta, int(embd.shape[-1]) if embd is not None else 0)
    tensors, types = read_tensors(reader, cfg)
    log(f"read and dequantised {len(reader.tensors)} tensors in {time.perf_counter() - started:.1f} s")
    tokenizer = convert_tokenizer(meta, cfg.context_length)
    check_tokenizer(tokenizer, meta)
    sha = sha256_of(path)
    provenance = {"source_file": path.name, "source_sha256": sha, "source_format": "gguf",
                  "gguf_tokenizer_pre": meta.get("tokenizer.ggml.pre"), **(source or {})}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_tensors(tensors, cfg, partial, tokenizer, meta={"imported_from": provenance},
                 card=model_card(path, sha, meta, cfg, types, source))
    if extra_files:
        for name, data in extra_files.items():
            (partial / name).write_bytes(data)
        write_checksums(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out
