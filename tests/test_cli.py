"""The `toyllm` CLI: verify-cache, generate, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
