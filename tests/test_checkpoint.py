"""Checkpoints: round trip, Hugging Face interchange both ways, and clear errors for damaged files."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_model

from toyllm_core import checkpoint
from toyllm_core.checkpoint import CheckpointError


@pytest.fixture()
def saved(tmp_path, model, tokenizer):
    return checkpoint.save(model, tmp_path / "ckpt", tokenizer, meta={"steps": 0})


def _logits(model, tokens):
    return np.asarray(jax.jit(model.__call__)(tokens))


def test_round_trip_gives_identical_logits(saved, model):
    files = sorted(p.name for p in saved.iterdir())
    assert files == ["MODEL_CARD.md", "checksums.sha256", "config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    loaded, hf = checkpoint.load(saved)
    assert hf["toyllm"] == {"steps": 0} and hf["model_type"] == "llama"
    tokens = np.arange(50, dtype=np.int32)
    np.testing.assert_array_equal(_logits(loaded, tokens), _logits(model, tokens))


def test_corrupted_weights_fail_with_the_file_named(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        checkpoint.load(saved)


def test_truncated_weights_fail_clearly_even_without_checksums(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        checkpoint.load(saved)
    (saved / "checksums.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        checkpoint.load(saved)


def test_wrong_checksum_entry_fails(saved):
    listing = saved / "checksums.sha256"
    lines = listing.read_text().splitlines()
    lines = [("0" * 64 + "  config.json") if line.endswith("config.json") else line for line in lines]
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 mismatch"):
        checkpoint.load(saved)


def test_shape_mismatch_names_the_tensor(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "checksums.sha256").unlink()
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight has shape"):
        checkpoint.load(saved)


def test_missing_directory_is_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpoint.load(tmp_path / "nope")


# ------------------------------------------------------------------- Hugging Face interchange
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, n_kv_heads):
    ours = tiny_model(n_kv_heads)
    directory = checkpoint.save(ours, tmp_path / "ckpt")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
    hf.eval()
    tokens = np.random.default_rng(0).integers(0, 50257, 96)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens[None])).logits[0].numpy()
    assert np.abs(theirs - _logits(ours, tokens.astype(np.int32))).max() < 1e-4


def test_transformers_checkpoint_loads_here_with_equal_logits(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        eos_token_id=999, bos_token_id=999,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so that the test covers them too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours, _ = checkpoint.load(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, 1000, 80)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens[None])).logits[0].numpy()
    assert np.abs(theirs - _logits(ours, tokens.astype(np.int32))).max() < 1e-4
