"""Checkpoints in Hugging Face Llama layout (interchangeable with `transformers.LlamaForCausalLM`).

A checkpoint directory holds:
  config.json            LlamaConfig fields + a "toyllm" block (training metadata)
  model.safetensors      HF tensor names, float32; the output projection is tied to the embedding
  tokenizer.json, tokenizer_config.json
  MODEL_CARD.md
  checksums.sha256       sha256sum format, one line per file above

Loading verifies checksums and shapes and fails with one `CheckpointError` line naming the bad file.
A directory written by `save_pretrained` (no checksums.sha256) loads too, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Self

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from . import tensors
from .config import ModelConfig
from .serving.model import ToyLLM

CHECKSUMS = "checksums.sha256"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""


# HF name (per-layer suffix) -> getter of the array in our model (stacked over layers).
_LAYER_TENSORS = {w.hf: w.get for w in tensors.BLOCK}
_GLOBAL_TENSORS = {w.hf: w.get for w in tensors.GLOBAL}


def _hf_tensors(model: ToyLLM) -> dict[str, np.ndarray]:
    """Every HF tensor of the model: `model.layers.{i}.*` are slices of the stacked arrays."""
    out = {name: np.asarray(get(model), np.float32) for name, get in _GLOBAL_TENSORS.items()}
    for suffix, get in _LAYER_TENSORS.items():
        stacked = np.asarray(get(model), np.float32)
        for i in range(model.cfg.n_layers):
            out[f"model.layers.{i}.{suffix}"] = stacked[i]
    return out


def config_to_hf(cfg: ModelConfig, toyllm_meta: dict | None = None, bos_token_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.eos_token_id if bos_token_id is None else bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
        "toyllm": toyllm_meta or {},
    }


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type is {hf.get('model_type')!r}, expected 'llama'")
    if not hf.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings must be true (ToyLLM ties the output projection to the embedding)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    eos = hf.get("eos_token_id", 50256)
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["max_position_embeddings"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        d_ff=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({cfg.head_dim})")
    return cfg


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(model: ToyLLM, directory: str | Path, tokenizer=None, meta: dict | None = None,
         card: str | None = None) -> Path:
    """Write a checkpoint directory (see the module docstring)."""
    return save_tensors(_hf_tensors(model), model.cfg, directory, tokenizer, meta, card)


def save_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, directory: str | Path, tokenizer=None,
                 meta: dict | None = None, card: str | None = None) -> Path:
    """Write a checkpoint directory from HF-named float32 tensors (an importer has no ToyLLM to save)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg, meta, bos), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / WEIGHTS).chmod(0o644)  # safetensors writes 0600; a checkpoint is meant to be shared
    if tokenizer is not None:
        # The chat template stays inside tokenizer_config.json (not a separate chat_template.jinja).
        tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    if card is None and not (directory / "MODEL_CARD.md").exists():
        card = f"# ToyLLM checkpoint\n\n{cfg.num_params():,} parameters; configuration in config.json.\n"
    if card is not None:
        (directory / "MODEL_CARD.md").write_text(card)
    write_checksums(directory)
    return directory


def write_checksums(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_of(p)}  {p.name}\n" for p in files]
    (directory / CHECKSUMS).write_text("".join(lines))


def verify(directory: Path) -> bool:
    """Check every file listed in checksums.sha256; False when there is no checksum file."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return False
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        expected, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {CHECKSUMS} but missing; the checkpoint is incomplete")
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: sha256 mismatch (expected {expected[:12]}…, got {actual[:12]}…); "
                "the file is corrupted or was modified, restore it or re-save the checkpoint"
            )
    return True


def read_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole config.json) of a checkpoint directory."""
    path = Path(directory) / "config.json"
    try:
        hf = json.loads(path.read_text())
        return config_from_hf(hf), hf
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; is {directory} a checkpoint directory?") from None
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid Llama config ({e})") from None


def load(directory: str | Path, verify_checksums: bool = True, dtype=jnp.float32) -> tuple[ToyLLM, dict]:
    """Load a checkpoint -> (model with its weights as `dtype`, config.json as a dict).

    The file is read one tensor at a time (one layer-stacked group at most is held on the host), and
    each goes straight to `dtype`: no float32 copy of the model is built, and none stays resident
    when serving in bfloat16 (reading the whole file first held 538 MB more for SmolLM2-135M)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if verify_checksums:
        verify(directory)
    cfg, hf = read_config(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with _TensorFile(path) as file:
            model = _load_tensors(file, cfg, dtype, path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from None
    return model, hf


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I32": np.int32, "I64": np.int64}


class _TensorFile:
    """A safetensors file read one tensor at a time with plain reads. (safetensors' own reader maps
    the file, and every page it touches counts in the process's resident memory until the file is
    closed: the whole checkpoint, on top of the model being built from it.)"""

    def __init__(self, path: Path):
        self._file = path.open("rb")
        (n,) = struct.unpack("<Q", self._file.read(8))
        self.header = json.loads(self._file.read(n))
        self.header.pop("__metadata__", None)
        self._base = 8 + n

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get_tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        data = os.pread(self._file.fileno(), end - start, self._base + start)
        return np.frombuffer(data, _SAFETENSORS_DTYPES[info["dtype"]]).reshape(self.shape(name))


def _load_tensors(file: _TensorFile, cfg: ModelConfig, dtype, path: Path) -> ToyLLM:
    """The model from an open safetensors file, checked against the config's shapes first."""
    names = set(file.keys()) - {"lm_head.weight"}  # tied: identical to the embedding when present
    model = eqx.filter_eval_shape(ToyLLM, cfg, jax.random.PRNGKey(0))  # shapes only: every leaf is replaced
    expected = {name: arr.shape for name, arr in _hf_tensors_shapes(model).items()}
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, want in expected.items():
        shape = file.shape(name)
        if shape != want:
            raise CheckpointError(f"{path}: {name} has shape {shape}, config.json implies {want}")
    getters = list(_GLOBAL_TENSORS.values()) + list(_LAYER_TENSORS.values())
    values = [jnp.asarray(file.get_tensor(name), dtype) for name in _GLOBAL_TENSORS]
    for suffix in _LAYER_TENSORS:
        layers = np.stack([file.get_tensor(f"model.layers.{i}.{suffix}") for i in range(cfg.n_layers)])
        values.append(jnp.asarray(layers, dtype))
        del layers
    return eqx.tree_at(lambda m: [g(m) for g in getters], model, values)


def _hf_tensors_shapes(model: ToyLLM) -> dict[str, jax.ShapeDtypeStruct]:
    out = {name: get(model) for name, get in _GLOBAL_TENSORS.items()}
    for suffix, get in _LAYER_TENSORS.items():
        stacked = get(model)
        for i in range(model.cfg.n_layers):
            out[f"model.layers.{i}.{suffix}"] = jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
    return out
