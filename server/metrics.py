"""Prometheus metrics (README, "Metrics"): one registry per app, prefix `toyllm_`, base units, no session ids.

Counters and histograms are updated where things happen (routes, engine). Gauges that describe live
state (cache bytes, sessions, running and waiting requests) are read at scrape time from the
session store and the engine, so they always equal what is live.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from toyllm_core import jit_stats

disable_created_metrics()  # no `_created` series: dashboards never use them

# Sub-millisecond decode steps on this CPU up to minute-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
                   120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Liveness, readiness and scrapes: polled while the model loads and warms up (a readiness loop, a
# container healthcheck, Prometheus), so they are counted apart from the API traffic.
PROBE_ENDPOINTS = frozenset({"/health", "/ready", "/metrics"})


class LiveState(Collector):
    """Gauges computed at scrape time from callables returning {labels-tuple: value} or a number."""

    def __init__(self, read: Callable[[], dict]):
        self._read = read

    def collect(self):
        state = self._read()
        cache = GaugeMetricFamily("toyllm_kv_cache_bytes", "Bytes of the live KV caches (kept tokens).",
                                  labels=["policy"])
        full = GaugeMetricFamily("toyllm_kv_cache_full_equivalent_bytes",
                                 "Bytes full caches would hold for the same tokens.", labels=["policy"])
        for policy, (kept, full_bytes) in sorted(state["cache_bytes"].items()):  # every policy, 0 when unused
            cache.add_metric([policy], kept)
            full.add_metric([policy], full_bytes)
        yield cache
        yield full
        tiers = GaugeMetricFamily("toyllm_kv_cache_tier_bytes", "Bytes of the sessions' cache tiers: hot (what "
                                  "decoding attends to) and cold (what the hot cache evicted, quantised, in host "
                                  "memory).", labels=["tier"])
        for tier, n in sorted(state["tier_bytes"].items()):
            tiers.add_metric([tier], n)
        yield tiers
        yield GaugeMetricFamily("toyllm_kv_cache_capacity_bytes", "Bytes allocated for KV caches (all slots).",
                                value=state["capacity_bytes"])
        yield GaugeMetricFamily("toyllm_sessions_active", "Live sessions.", value=state["sessions"])
        yield GaugeMetricFamily("toyllm_requests_running", "Requests decoding now.", value=state["running"])
        yield GaugeMetricFamily("toyllm_requests_waiting", "Requests queued for the engine.", value=state["waiting"])
        info = GaugeMetricFamily("toyllm_model_info", "The served model (value 1).", labels=list(state["model"]))
        info.add_metric(list(state["model"].values()), 1)
        yield info
        yield CounterMetricFamily("toyllm_jit_compilations", "Programs built in this process (compiled by XLA, "
                                  "or read from the persistent compilation cache).",
                                  value=jit_stats.compilations())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name, doc, labels=(), buckets=LATENCY_BUCKETS):
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        self.request_duration = hist("toyllm_request_duration_seconds", "End-to-end request time.")
        self.ttft = hist("toyllm_time_to_first_token_seconds", "Arrival to first token.")
        self.itl = hist("toyllm_inter_token_latency_seconds", "Time between a request's consecutive tokens.")
        self.queue_time = hist("toyllm_request_queue_time_seconds", "Arrival to the start of prefill.")
        self.prefill_duration = hist("toyllm_prefill_duration_seconds", "Prefill time per request.")
        self.decode_step = hist("toyllm_decode_step_duration_seconds", "One batched decode step (all rows).")
        self.batch_size = hist("toyllm_decode_batch_size", "Rows in a batched decode step.", buckets=BATCH_BUCKETS)
        self.compression_duration = hist("toyllm_kv_compression_duration_seconds", "One decode-time compression "
                                         "call (every due row of a class together), from its dispatch to its end.",
                                         ["policy"])
        self.requests = Counter("toyllm_requests", "HTTP requests by endpoint and status code (API traffic: "
                                "probes and scrapes are toyllm_probe_requests).", ["endpoint", "code"], registry=r)
        self.probes = Counter("toyllm_probe_requests", "Liveness, readiness and metrics requests by endpoint "
                              "and status code.", ["endpoint", "code"], registry=r)
        self.finished = Counter("toyllm_requests_finished", "Generations by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("toyllm_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("toyllm_generation_tokens", "Tokens generated.", registry=r)
        self.compressions = Counter("toyllm_kv_compressions", "Cache compressions.", ["policy"], registry=r)
        self.evicted = Counter("toyllm_kv_tokens_evicted", "Tokens evicted from caches (per layer and KV head).",
                               ["policy"], registry=r)
        self.reselections = Counter("toyllm_kv_reselections", "Re-selections of a session's hot set over hot "
                                    "and cold tiers (one per turn of a session with cold tokens).", ["policy"],
                                    registry=r)
        self.recalled = Counter("toyllm_kv_tokens_recalled", "Tokens brought back from the cold tier to the hot "
                                "cache by re-selections (per layer and KV head).", ["policy"], registry=r)
        self.sessions_created = Counter("toyllm_sessions_created", "Sessions created.", registry=r)
        self.sessions_evicted = Counter("toyllm_sessions_evicted", "Sessions removed by the server, by reason.",
                                        ["reason"], registry=r)
        self.pressure_steps = Counter("toyllm_session_pressure_steps", "Memory-pressure steps taken on idle "
                                      "sessions: compressed, demoted, dropped (server/pressure.py).", ["step"],
                                      registry=r)
        self.pressure_freed = Counter("toyllm_session_pressure_freed_bytes", "Bytes of session tiers freed by "
                                      "memory-pressure steps.", ["step"], registry=r)

        self.sessions_saved = Counter("toyllm_sessions_saved", "Session blobs written to the session backend.",
                                      registry=r)
        self.sessions_loaded = Counter("toyllm_sessions_loaded", "Sessions read from the session backend (a "
                                       "restart, another replica's session, or one spilled under pressure).",
                                       registry=r)

    def pressure_step(self, step: str, freed: int) -> None:
        self.pressure_steps.labels(step).inc()
        self.pressure_freed.labels(step).inc(freed)

    def count_request(self, endpoint: str, code: int | str) -> None:
        """Count one finished HTTP request: in toyllm_requests_total, or toyllm_probe_requests_total for
        /health, /ready and /metrics."""
        counter = self.probes if endpoint in PROBE_ENDPOINTS else self.requests
        counter.labels(endpoint, str(code)).inc()

    def watch(self, read: Callable[[], dict]) -> None:
        self.registry.register(LiveState(read))

    def init_labels(self, policies: list[str]) -> None:
        """Export every known label value from the start (at 0), so that dashboards show zeros
        rather than no data before the first event."""
        for reason in ("length", "stop", "eos", "cancelled"):
            self.finished.labels(reason)
        for reason in ("ttl", "memory", "max_sessions", "quota"):
            self.sessions_evicted.labels(reason)
        for step in ("compressed", "demoted", "spilled", "dropped"):
            self.pressure_steps.labels(step)
            self.pressure_freed.labels(step)
        for policy in policies:
            self.compressions.labels(policy)
            self.evicted.labels(policy)
            self.compression_duration.labels(policy)
            self.reselections.labels(policy)
            self.recalled.labels(policy)
