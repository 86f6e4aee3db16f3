"""The `toyllm` CLI: verify-cache, generate, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model

from toyllm_core import checkpoint


def toyllm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    return checkpoint.save(tiny_model(), tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer)


def test_verify_cache_passes_and_prints_the_difference():
    result = toyllm("verify-cache", "--preset", "tiny", "--length", "256")
    assert result.returncode == 0, result.stderr
    assert "max |logit difference| over 256 positions" in result.stdout and "OK" in result.stdout


def test_generate_streams_text_and_reports_cache_stats(ckpt):
    result = toyllm("generate", "--checkpoint", str(ckpt), "--prompt", "Once upon a time", "--max-new-tokens", "100",
                    "--policy", "snapkv", "--budget", "32", "--temperature", "0", "--stats")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["tokens_kept"] <= 32 + 16 and stats["compressions"] >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "lru"], "unknown cache policy 'lru'"),
        (["--budget", "10"], "must not exceed the budget"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--checkpoint", "/nonexistent"], "no checkpoint there"),
    ],
)
def test_bad_input_is_one_readable_line_and_nonzero_exit(args, message):
    result = toyllm("generate", "--prompt", "hi", "--preset", "tiny", *args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


# --stop escapes, special tokens, and the default checkpoint from any working directory.

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("\\n\\n", "\n\n"),
        ("a\\tb\\r\\n", "a\tb\r\n"),
        ("\\\\n", "\\n"),  # an escaped backslash, then a plain n
        ("café\\nnaïve — 😀", "café\nnaïve — 😀"),  # non-ASCII text untouched
        ("\n\n", "\n\n"),  # a real newline ($'\n\n' in bash) stays
        ("\\x41 \\d", "\\x41 \\d"),  # other backslashes stay
    ],
)
def test_stop_strings_unescape_the_common_escapes(given, meant):
    from toyllm_core.cli import unescape

    assert unescape(given) == meant


def _scripted_generation(monkeypatch, tokenizer, text: str, eos: bool = True) -> None:
    """Make `toyllm generate` produce exactly the tokens of `text` (then end-of-text)."""
    from types import SimpleNamespace

    import toyllm_core.serving.generate as gen

    def fake(model, prompts, policies, sampling, **_):
        seq = SimpleNamespace(remaining=1, length=0, compressions=0)
        for token in tokenizer.encode(text) + ([tokenizer.eos_token_id] if eos else []):
            if seq.remaining == 0:
                return
            yield gen.Generated(token, 0.0, seq)

    monkeypatch.setattr(gen, "generate_tokens", fake)


def _generate(*args):
    from typer.testing import CliRunner

    from server.cli import app

    return CliRunner().invoke(app, ["generate", "--preset", "tiny", "--prompt", "Q:", *args])


def test_generate_stop_takes_escaped_newlines(monkeypatch, tokenizer):
    _scripted_generation(monkeypatch, tokenizer, " one\n\ntwo")
    result = _generate("--stop", "\\n\\n")  # what the shell passes for --stop "\n\n"
    assert result.exit_code == 0, result.output
    assert result.stdout == "Q: one\n"


def test_generate_prints_no_special_tokens(monkeypatch, tokenizer):
    _scripted_generation(monkeypatch, tokenizer, " Hello world.")
    result = _generate()
    assert result.exit_code == 0, result.output
    assert result.stdout == "Q: Hello world.\n"


def _run_elsewhere(cwd, *args, weights_dir=None, timeout=300):
    """The CLI run from `cwd` (not the repository), with TOYLLM_WEIGHTS_DIR set or unset."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TOYLLM_WEIGHTS_DIR"}
    if weights_dir is not None:
        env["TOYLLM_WEIGHTS_DIR"] = str(weights_dir)
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def test_default_checkpoint_is_the_checkout_weights_whatever_the_working_directory(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TOYLLM_WEIGHTS_DIR"}
    code = "from toyllm_core.weights import DEFAULT_CHECKPOINT; print(DEFAULT_CHECKPOINT)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == str(REPO / "weights" / "smollm2-135m-instruct")


def test_weights_dir_comes_from_the_environment_then_the_checkout_then_the_user_data_dir(tmp_path):
    from toyllm_core.weights import weights_dir

    checkout, installed = tmp_path / "checkout", tmp_path / "site-packages"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    installed.mkdir()
    assert weights_dir({}, checkout) == checkout / "weights"
    assert weights_dir({"TOYLLM_WEIGHTS_DIR": str(tmp_path / "w")}, checkout) == tmp_path / "w"
    assert weights_dir({"XDG_DATA_HOME": str(tmp_path / "data")}, installed) == tmp_path / "data" / "toyllm" / "weights"


def test_verify_cache_checks_the_default_checkpoint_from_another_directory(tmp_path, tokenizer):
    weights = tmp_path / "weights"
    checkpoint.save(tiny_model(), weights / "smollm2-135m-instruct", tokenizer)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run_elsewhere(elsewhere, "verify-cache", "--length", "32", weights_dir=weights)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("smollm2-135m-instruct: max |logit difference| over 32 positions")


def test_verify_cache_without_the_default_checkpoint_says_to_pull_it(tmp_path):
    result = _run_elsewhere(tmp_path, "verify-cache", "--length", "32", weights_dir=tmp_path / "empty")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert str(tmp_path / "empty" / "smollm2-135m-instruct") in result.stderr
    assert "run `toyllm pull smollm2-135m-instruct`" in result.stderr


def test_verify_cache_tolerance_scales_with_the_largest_logit():
    # toyllm-base's logits reach ~8: the 1e-4 tolerance counts per unit of them (float32 rounding grows too).
    result = toyllm("verify-cache", "--checkpoint", str(REPO / "weights" / "toyllm-base"), "--length", "64")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("toyllm-base: max |logit difference| over 64 positions") and "(OK, tolerance 1e-04 x max |logit| " in line
