"""The OpenAI request fields: implemented (logprobs with alternatives, echo, include_usage, top_k,
64-bit seeds) or refused with a 422 naming them; never silently ignored. In process, tiny model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from server_utils import parse_sse, ready_client, wait_ready
from test_chat import TEST_TEMPLATE

MODEL = "random-tiny"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "template.jinja"
    path.write_text(TEST_TEMPLATE)
    with ready_client(chat_template=path) as c:
        wait_ready(c)
        yield c


def _complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "The history of", "max_tokens": 5,
                                                "temperature": 0, **body})


def _reference_logprobs(client, ids: list[int]) -> np.ndarray:
    """log-softmax of the next-token logits after `ids`, by full recomputation (float32)."""
    model = client.app.state.toyllm.model
    logits = np.asarray(model(np.array(ids, np.int32)))[-1].astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def test_completion_logprobs_equal_recomputation(client):
    r = _complete(client, logprobs=3)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    tok = client.app.state.toyllm.tokenizer
    ids = tok("The history of")["input_ids"]
    ref = _reference_logprobs(client, ids)
    top = np.argsort(-ref)[:3]
    assert list(lp["top_logprobs"][0]) == [tok.decode([i]) for i in top]
    assert np.allclose(list(lp["top_logprobs"][0].values()), ref[top], atol=1e-4)
    # Greedy: every chosen token is the likeliest alternative.
    for chosen, alternatives in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen == pytest.approx(max(alternatives.values()), abs=1e-6)
    text = r.json()["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == text


def test_generate_top_logprobs_in_token_events(client):
    r = client.post("/generate", json={"prompt": "The history of", "max_new_tokens": 3, "temperature": 0,
                                       "top_logprobs": 4})
    tokens = [d for n, d in parse_sse(r.text) if n == "token"]
    assert all(len(t["top_logprobs"]) == 4 and t["top_logprobs"][0]["id"] == t["id"] for t in tokens)
    plain = client.post("/generate", json={"prompt": "The history of", "max_new_tokens": 3, "temperature": 0})
    assert all("top_logprobs" not in d for n, d in parse_sse(plain.text) if n == "token")
    assert client.post("/generate", json={"prompt": "x", "top_logprobs": 21}).status_code == 422


def test_echo_prepends_the_prompt(client):
    plain = _complete(client).json()["choices"][0]["text"]
    echoed = _complete(client, echo=True).json()["choices"][0]["text"]
    assert echoed == "The history of" + plain
    chunks = [d for _, d in parse_sse(_complete(client, echo=True, stream=True).text) if d != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed


def test_stream_usage_when_asked(client):
    events = [d for _, d in parse_sse(_complete(client, stream=True, stream_options={"include_usage": True}).text)]
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-2])
    plain = [d for _, d in parse_sse(_complete(client, stream=True).text) if d != "[DONE]"]
    assert all("usage" not in e for e in plain)


def test_top_k_is_the_vllm_extension(client):
    """top_k=1 samples the argmax whatever the temperature; -1 and 0 are off."""
    greedy = _complete(client).json()["choices"][0]["text"]
    for seed in (1, 2, 3):
        assert _complete(client, temperature=1.5, top_k=1, seed=seed).json()["choices"][0]["text"] == greedy
    assert _complete(client, top_k=-1).status_code == 200
    assert _complete(client, top_k=-2).status_code == 422


def test_ignore_eos_and_cache_are_completion_extensions(client):
    """As vLLM and llama.cpp's server take them: ignore_eos generates past the end-of-text token; `cache`
    names the class a stateless request runs under (one of the server's)."""
    first = _complete(client).json()
    ids = [d["id"] for n, d in parse_sse(client.post("/generate", json={"prompt": "The history of", "max_new_tokens": 5,
                                                                        "temperature": 0}).text) if n == "token"]
    engine = client.app.state.toyllm.engine.core
    eos, engine.eos = engine.eos, ids[0]  # the token greedy decoding makes first now ends the text
    try:
        stopped = _complete(client).json()
        kept_going = _complete(client, ignore_eos=True).json()
    finally:
        engine.eos = eos
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 0
    assert kept_going["usage"]["completion_tokens"] == 5
    assert kept_going["choices"][0]["text"] == first["choices"][0]["text"]
    assert _complete(client, cache={"policy": "full"}).json()["choices"][0]["text"] == first["choices"][0]["text"]
    refused = _complete(client, cache={"policy": "h2o", "budget": 7})
    assert refused.status_code == 422 and "cache" in refused.text


@pytest.mark.parametrize("field, value", [("best_of", 2), ("frequency_penalty", 0.5), ("presence_penalty", -1),
                                          ("logit_bias", {"50256": -100}), ("suffix", "end"), ("n", 2),
                                          ("tools", []), ("logprobs", 6), ("made_up_field", 1)])
def test_unsupported_completion_fields_are_refused_by_name(client, field, value):
    r = _complete(client, **{field: value})
    assert r.status_code == 422 and field in r.json()["error"]["message"], r.text


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    r = _complete(client, best_of=1, frequency_penalty=0, presence_penalty=0, logit_bias={}, n=1, user="me")
    assert r.status_code == 200, r.text
    # echo with logprobs: the prompt's tokens come first, their log-probabilities not computed (null).
    lp = _complete(client, echo=True, logprobs=1).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][:3] == [None] * 3 and all(x <= 0 for x in lp["token_logprobs"][3:])
    assert len(lp["tokens"]) == 3 + 5 and "".join(lp["tokens"][:3]) == "The history of"


def _chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 4, "temperature": 0, **body})


def test_chat_logprobs(client):
    r = _chat(client, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["bytes"] == list(entry["token"].encode())
    streamed = [d for _, d in parse_sse(_chat(client, logprobs=True, stream=True).text) if d != "[DONE]"]
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in streamed if c["choices"][0]["logprobs"]) == \
        len(content)
    assert len(_chat(client, top_logprobs=2).json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert _chat(client).json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function"}]), ("response_format", {"type": "json"}),
                                          ("frequency_penalty", 1), ("top_logprobs", 21), ("n", 3)])
def test_unsupported_chat_fields_are_refused_by_name(client, field, value):
    r = _chat(client, **{field: value}, **({"logprobs": True} if field == "top_logprobs" else {}))
    assert r.status_code == 422 and field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "hi \ud800"}], "messages.0.content"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "\udfff"}], "messages.1.content"),
    ([{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "hi \ud800 x"}]}],
     "messages.0.content.list[ContentPart].1.text"),
])
def test_chat_lone_surrogates_are_a_422_naming_the_field(client, messages, field, stream):
    # json.dumps writes the unpaired surrogate as the escape "\ud800", which JSON parsers decode to it.
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2, "stream": stream})
    assert "\\ud" in body
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    error = r.json()["error"]
    assert error["type"] == "validation_error" and field in error["message"] and "unicode string" in error["message"]
    # As /generate's and /v1/completions' prompts.
    for path, refused in (("/generate", {"prompt": "hi \ud800"}), ("/v1/completions", {"model": MODEL, "prompt": "\ud800"})):
        r = client.post(path, content=json.dumps(refused), headers={"content-type": "application/json"})
        assert r.status_code == 422 and "prompt" in r.json()["error"]["message"], r.text


def test_head_cors_and_offline_docs(client):
    assert client.head("/health").status_code == 200 and client.head("/ready").status_code == 200
    assert client.options("/generate", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"}
                          ).status_code == 405  # no CORS unless configured
    html = client.get("/docs").text
    assert "cdn" not in html.lower()
    urls = re.findall(r"""["']([^"']*swagger-ui(?:-bundle\.js|\.css))["']""", html)
    assert len(urls) == 2 and all(u.startswith("/") for u in urls), urls  # served here, not from a CDN
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 100_000


def test_cors_origins_setting():
    with ready_client(cors_origins=["http://app.example"]) as c:
        wait_ready(c)
        r = c.options("/generate", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = c.options("/generate", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400



def test_allow_lists_every_method_and_bad_utf8_is_a_validation_error(client):
    r = client.request("OPTIONS", "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert client.request("PUT", "/sessions/x").headers["allow"] == "DELETE, GET"
    r = client.post("/sessions", content=b"\xe2Q", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"


def test_the_documented_seed_bound_is_exact(client):
    text = client.get("/openapi.json").text
    assert '"exclusiveMaximum":18446744073709551616' in text.replace(" ", "") and "e+19" not in text


def test_a_token_holding_part_of_a_character_is_labelled_by_its_bytes(client):
    """Byte-level BPE splits 東 across tokens: each piece is labelled `bytes:\\x..` (as OpenAI does),
    never U+FFFD, and its chat `bytes` are its own, which together spell the character."""
    from server.generation import token_raw_bytes, token_text

    state = client.app.state.toyllm
    ids = state.tokenizer("東")["input_ids"]
    assert len(ids) > 1
    labels = [token_text(state, i) for i in ids]
    assert all(label.startswith("bytes:\\x") for label in labels), labels
    assert b"".join(token_raw_bytes(state, i) for i in ids).decode() == "東"
    assert token_text(state, state.tokenizer("The")["input_ids"][0]) == "The"  # whole characters: their text

    r = _complete(client, prompt="東京 is", echo=True, logprobs=1, max_tokens=1)
    lp = r.json()["choices"][0]["logprobs"]
    assert "\ufffd" not in "".join(lp["tokens"]) and lp["tokens"][0].startswith("bytes:")
    text = r.json()["choices"][0]["text"]
    assert text.startswith("東京 is")
    is_at = lp["tokens"].index(" is")
    assert text[lp["text_offset"][is_at]:].startswith(" is")  # offsets count each character once
