"""Shared fixtures: tiny random models (the GPT-2 vocabulary, so the real tokenizer works)."""

from __future__ import annotations

import functools
import os

# Tests never reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import pytest

# Float32 matmuls in full on every backend (GPUs default to TF32): exact-equality tests hold there too.
jax.config.update("jax_default_matmul_precision", "highest")

from toyllm_core.config import get_preset
from toyllm_core.machine import memory_maps
from toyllm_core.serving import executables
from toyllm_core.serving.model import ToyLLM


@functools.cache
def tiny_model(n_kv_heads: int = 2, seed: int = 0, **changes) -> ToyLLM:
    cfg = get_preset("tiny").replace(n_kv_heads=n_kv_heads, **changes)
    return ToyLLM(cfg, jax.random.PRNGKey(seed))


@pytest.fixture(scope="session")
def model() -> ToyLLM:
    return tiny_model()


@pytest.fixture(scope="session")
def tokenizer():
    from toyllm_core.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a test module once they hold a third of the process's
    memory maps. XLA's CPU backend maps every compiled kernel's code and data separately (~180 maps
    per serving program), and a process that keeps every program the whole suite compiles passes
    Linux's default vm.max_map_count (65,530): the next compile then crashes inside XLA."""
    yield
    maps = memory_maps()
    if maps is None or maps[0] > maps[1] // 3:
        jax.clear_caches()
        executables.forget_all()
