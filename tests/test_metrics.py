"""Metrics count served traffic only: neither the warm-up nor the probes polled while it runs."""

from __future__ import annotations

from server_utils import metric, ready_client, wait_ready

from server.metrics import Metrics

# Counters and histogram counts that only served requests feed.
SERVED = ["toyllm_generation_tokens_total", "toyllm_prompt_tokens_total", "toyllm_sessions_created_total",
          "toyllm_decode_step_duration_seconds_count", "toyllm_decode_batch_size_count",
          "toyllm_prefill_duration_seconds_count", "toyllm_time_to_first_token_seconds_count",
          "toyllm_inter_token_latency_seconds_count", "toyllm_request_duration_seconds_count",
          "toyllm_request_queue_time_seconds_count"]
REASONS = ("length", "stop", "eos", "cancelled")


def _total(text: str, name: str) -> float:
    """The sum of every sample of `name`, whatever its labels."""
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_probe_endpoints_are_counted_apart_from_api_requests():
    m = Metrics()
    for endpoint, code in [("/ready", 503), ("/ready", 200), ("/health", 200), ("/metrics", 200),
                           ("/generate", 200), ("/v1/chat/completions", 422)]:
        m.count_request(endpoint, code)
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    assert _total(text, "toyllm_requests_total") == 2
    assert metric(text, "toyllm_requests_total", endpoint="/generate", code="200") == 1
    assert _total(text, "toyllm_probe_requests_total") == 4
    assert metric(text, "toyllm_probe_requests_total", endpoint="/ready", code="503") == 1


def test_after_warm_up_no_traffic_is_counted():
    # One small full-cache class: few programs to compile, the same warm-up path as a real server.
    with ready_client(warmup=True, cache_policy="full", cache_classes=[], max_concurrent_requests=1,
                      max_prefill_chunk=16, interleave_chunk=16) as c:
        wait_ready(c, timeout=600)
        assert c.app.state.toyllm.info["warmup"]["programs"] > 0
        text = c.get("/metrics").text
    assert metric(text, "toyllm_jit_compilations_total") > 0  # the warm-up did compile
    for name in SERVED:
        assert metric(text, name) == 0, name
    for reason in REASONS:
        assert metric(text, "toyllm_requests_finished_total", finish_reason=reason) == 0, reason


def test_readiness_polls_during_start_up_are_not_api_requests():
    with ready_client() as c:
        wait_ready(c)  # polls /ready, 503 until loaded
        c.get("/health")
        text = c.get("/metrics").text
    assert _total(text, "toyllm_requests_total") == 0
    assert metric(text, "toyllm_probe_requests_total", endpoint="/ready", code="200") == 1
