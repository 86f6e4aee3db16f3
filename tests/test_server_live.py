"""A real `toyllm serve` (uvicorn) subprocess on a free localhost port: warm-up and compilations,
client disconnects, batching of concurrent streams, the openai client, every documented metric, and
`toyllm loadtest`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_utils import free_port, live_server, metric
from test_chat import TEST_TEMPLATE

METRICS = {
    "histogram": ["toyllm_request_duration_seconds", "toyllm_time_to_first_token_seconds",
                  "toyllm_inter_token_latency_seconds", "toyllm_request_queue_time_seconds",
                  "toyllm_prefill_duration_seconds", "toyllm_decode_step_duration_seconds",
                  "toyllm_decode_batch_size", "toyllm_kv_compression_duration_seconds"],
    "counter": ["toyllm_requests_total", "toyllm_requests_finished_total", "toyllm_prompt_tokens_total",
                "toyllm_generation_tokens_total", "toyllm_kv_compressions_total", "toyllm_kv_tokens_evicted_total",
                "toyllm_sessions_created_total", "toyllm_sessions_evicted_total", "toyllm_jit_compilations_total"],
    "gauge": ["toyllm_sessions_active", "toyllm_requests_running", "toyllm_requests_waiting", "toyllm_kv_cache_bytes",
              "toyllm_kv_cache_full_equivalent_bytes", "toyllm_kv_cache_capacity_bytes", "toyllm_model_info"],
}


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    """The live server's settings, with a compile cache of its own."""
    directory = tmp_path_factory.mktemp("server")
    template = directory / "chat.jinja"
    template.write_text(TEST_TEMPLATE)
    return {"TOYLLM_COMPILE_CACHE_DIR": str(directory / "xla"), "TOYLLM_PRESET": "tiny", "TOYLLM_CHAT_TEMPLATE": str(template), "TOYLLM_MAX_CONCURRENT_REQUESTS": "2",
           "TOYLLM_MAX_PROMPT_TOKENS": "32", "TOYLLM_CACHE_BUDGET": "32", "TOYLLM_CACHE_WINDOW_SIZE": "8",
           "TOYLLM_CACHE_SLACK": "8", "TOYLLM_WARMUP": "true", "TOYLLM_COLD_TOKENS": "512"}


@pytest.fixture(scope="module")
def server(server_env, tmp_path_factory):
    with live_server(server_env, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def _metrics(url) -> str:
    return httpx.get(url + "/metrics").text


def test_after_warmup_serving_compiles_nothing(server):
    before = metric(_metrics(server), "toyllm_jit_compilations_total")
    assert before > 0
    bodies = [{"prompt": "one two three " * (i + 1), "max_new_tokens": 50, "temperature": t, "top_k": k,
               "top_logprobs": n} for i, (t, k, n) in enumerate([(0, 0, 0), (0.8, 0, 5), (0.8, 20, 0)])]
    threads = [threading.Thread(target=httpx.post, args=(server + "/generate",),
                                kwargs={"json": b, "timeout": 120}) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metric(_metrics(server), "toyllm_jit_compilations_total") == before


def test_a_second_start_loads_every_program_it_saved_and_compiles_none(server, server_env, tmp_path):
    """The second start loads every program whole (a damaged file is compiled again and replaced), and
    the loaded programs generate what the first start's compiled ones did, token for token."""
    first = httpx.get(server + "/info").json()["warmup"]
    assert first["cache_hits"] == 0 and first["compilations"] > 0 and first["compile_cache_bytes"] > 0
    assert first["saved"] > 0 and first["loaded"] == 0
    bodies = [{"prompt": "one two three four", "max_new_tokens": 12, "temperature": 0.8, "top_k": 40, "seed": 7,
               "ignore_eos": True, "stream": False, "cache": cache}
              for cache in ({"policy": "full"}, {"policy": "snapkv"})]
    expected = [httpx.post(server + "/generate", json=b, timeout=60).json()["generated_text"] for b in bodies]
    damaged = min(Path(server_env["TOYLLM_COMPILE_CACHE_DIR"]).rglob("*.bin"))
    damaged.write_bytes(b"not a program")
    with live_server(server_env, tmp_path / "again.log") as again:
        second = httpx.get(again + "/info").json()["warmup"]
        before = metric(_metrics(again), "toyllm_jit_compilations_total")
        got = [httpx.post(again + "/generate", json=b, timeout=60).json()["generated_text"] for b in bodies]
        after = metric(_metrics(again), "toyllm_jit_compilations_total")
    assert second["programs"] == first["programs"]
    # Every program loaded whole (neither traced nor compiled) but the damaged one, which was compiled
    # and saved again; serving compiled nothing.
    assert second["loaded"] == first["saved"] - 1 and second["compilations"] == 1 and second["saved"] == 1
    assert damaged.read_bytes() != b"not a program"
    assert got == expected and after == before


def test_two_concurrent_streams_are_batched(server):
    def ones_and_twos():
        text = _metrics(server)
        le1 = metric(text, "toyllm_decode_batch_size_bucket", le="1.0")
        le2 = metric(text, "toyllm_decode_batch_size_bucket", le="2.0")
        return le2 - le1

    before = ones_and_twos()
    # A long stream runs while a second request comes and goes: they must share decode steps.
    with httpx.Client(base_url=server, timeout=120) as c, \
            c.stream("POST", "/generate", json={"prompt": "a b c", "max_new_tokens": 2000}) as long:
        lines = long.iter_lines()  # kept open: leaving a `for` over iter_lines() hangs up
        while not next(lines).startswith("data:"):
            pass
        r = c.post("/generate", json={"prompt": "d e f", "max_new_tokens": 20, "stream": False})
        assert r.status_code == 200
    assert ones_and_twos() > before  # steps that decoded both streams together


def test_disconnect_stops_generation_and_frees_the_session(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        finished_before = metric(_metrics(server), "toyllm_requests_finished_total", finish_reason="cancelled")
        with c.stream("POST", "/generate", json={"prompt": "go", "max_new_tokens": 2000}) as r:
            sid = r.headers["x-session-id"]
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one token seen: hang up
        deadline = time.time() + 10
        while c.get(f"/sessions/{sid}").json()["busy"] and time.time() < deadline:
            time.sleep(0.05)
        info = c.get(f"/sessions/{sid}").json()
        assert info["busy"] is False and info["cache"]["tokens_seen"] < 1000
        assert metric(_metrics(server), "toyllm_requests_finished_total", finish_reason="cancelled") == \
            finished_before + 1
        assert metric(_metrics(server), "toyllm_requests_running") == 0
        r = c.post("/generate", json={"prompt": "and on", "session_id": sid, "max_new_tokens": 2, "stream": False})
        assert r.status_code == 200


def test_openai_client_streaming_and_not(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    models = client.models.list()
    name = models.data[0].id
    assert name == "random-tiny"
    out = client.completions.create(model=name, prompt="Hello there", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=name, prompt="Hello there", max_tokens=5, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_openai_client_chat_streaming_and_not_and_in_a_session(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model="random-tiny", messages=messages, max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 4
    chunks = list(client.chat.completions.create(model="random-tiny", messages=messages, max_tokens=4,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # A session (the session_id extension): the second turn prefills only itself.
    sid = httpx.post(server + "/sessions", json={}).json()["session_id"]
    first = client.chat.completions.create(model="random-tiny", messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"session_id": sid})
    follow = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "Hi there"}]
    second = client.chat.completions.create(model="random-tiny", messages=follow, max_tokens=4, temperature=0,
                                            extra_body={"session_id": sid})
    from toyllm_core.chat import ChatTemplate
    from toyllm_core.tokenizer import gpt2_tokenizer

    closed = "<|endoftext|>" if first.choices[0].finish_reason == "stop" else ""
    new_text = ChatTemplate(TEST_TEMPLATE).continuation(follow[:2], follow[2:], closed)
    assert second.usage.prompt_tokens == len(gpt2_tokenizer()(new_text).input_ids) < first.usage.prompt_tokens + 3


def test_every_metric_is_exported_and_moves(server):
    text = _metrics(server)
    for kind, names in METRICS.items():
        for name in names:
            assert f"# TYPE {name} {kind}" in text, name
    before = {n: metric(text, n) for n in ("toyllm_prompt_tokens_total", "toyllm_generation_tokens_total",
                                           "toyllm_sessions_created_total")}
    compressions = metric(text, "toyllm_kv_compressions_total", policy="snapkv")
    r = httpx.post(server + "/generate", json={"prompt": "x y z " * 8, "max_new_tokens": 40, "stream": False},
                   timeout=120).json()
    text = _metrics(server)
    assert metric(text, "toyllm_prompt_tokens_total") == before["toyllm_prompt_tokens_total"] + r["usage"]["prompt_tokens"]
    assert metric(text, "toyllm_generation_tokens_total") == before["toyllm_generation_tokens_total"] + 40
    assert metric(text, "toyllm_sessions_created_total") == before["toyllm_sessions_created_total"] + 1
    assert metric(text, "toyllm_kv_compressions_total", policy="snapkv") > compressions  # budget 32 + slack 8
    assert metric(text, "toyllm_requests_total", endpoint="/generate", code="200") >= 1
    assert metric(text, "toyllm_model_info", name="random-tiny", checkpoint_sha256="none",
                  **{k: str(v) for k, v in httpx.get(server + "/info").json()["model"].items() if k != "name"}) == 1


def test_loadtest_reports_latencies(server, tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "server.cli", "loadtest", "--url", server, "--concurrency", "2",
                           "--requests", "4", "--turns", "2", "--prompt-tokens", "8", "--max-new-tokens", "12",
                           "--budget", "32", "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["ok"] == 4 and report["errors"] == {} and report["generated_tokens"] == 48
    assert report["ttft_s"]["n"] == 4 and report["itl_s"]["n"] == 4 * 11
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p99"]
    assert report["server"]["decode_step_mean_s"] > 0
    assert "tokens/s" in done.stdout


def test_loadtest_against_nothing_fails_in_one_line():
    done = subprocess.run([sys.executable, "-m", "server.cli", "loadtest", "--url", f"http://127.0.0.1:{free_port()}",
                           "--requests", "1"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_serve_without_a_checkpoint_fails_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--checkpoint", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent,
                          check=False)
    assert done.returncode == 2 and "no checkpoint" in done.stderr and len(done.stderr.strip().splitlines()) == 1
