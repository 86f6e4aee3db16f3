"""Server settings: every field can be set by an environment variable `TOYLLM_<FIELD>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from toyllm_core.weights import DEFAULT_CHECKPOINT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOYLLM_", extra="ignore")

    checkpoint: Path = DEFAULT_CHECKPOINT
    preset: str | None = Field(None, description="Serve random weights of this preset instead (tests, demos).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    chat_template: Path | None = Field(None, description="A Jinja chat template file to use instead of the "
                                       "checkpoint's own (for a checkpoint without one).")

    # Weights and K/V; scores, softmax and accumulators are float32 either way.
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # Block weights: as they are, or int8 weight-only (per-channel scales; docs/serving-speed.md).
    quant: Literal["none", "int8"] = "none"

    # The cache configuration a session gets when its request does not name one: SnapKV that keeps
    # every token up to `cache_budget` (the per-session allowance: nothing is compressed below it),
    # and past it keeps that many hot and the rest in a cold tier that each new turn re-selects from.
    cache_policy: str = "snapkv"
    cache_budget: int = Field(2048, ge=1)
    cache_sink_size: int = Field(4, ge=0)
    cache_window_size: int = Field(16, ge=0)
    cache_slack: int = Field(16, ge=1)
    cache_cold_bits: Literal[0, 4, 8] = Field(8, description="The default cache's cold tier: 8 or 4 bits, or 0 "
                                              "for none (evicted tokens are dropped).")
    cold_tokens: int = Field(8192, ge=256, description="The most tokens a session's cold tier holds (per layer "
                             "and KV head); past it, its oldest entries are dropped.")
    # The other cache configurations the server warms up and accepts (a request naming anything else
    # gets 422): `policy` or `policy:key=value,...`, e.g. `["full", "h2o:budget=128"]`.
    cache_classes: list[str] = ["full"]
    full_cache_tokens: list[int] | None = Field(None, description="Token limits of the full-cache classes "
                                                "[default: 2048 (when smaller) and the model context].")
    decode_state_bytes: int = Field(1 << 30, ge=1, description="Cache bytes for each class's decode slots; "
                                    "sets how many rows of a class decode at once (at most "
                                    "max_concurrent_requests).")

    # Sessions.
    max_sessions: int = Field(1024, ge=1)
    session_ttl_s: float = Field(900.0, gt=0)
    max_cache_bytes: int = Field(2 * 2**30, ge=1, description="Idle sessions are evicted, least recently "
                                 "used first, when their tiers (hot and cold) together pass this.")

    # Where sessions outlive the process (written after each turn, read when a request names a session
    # this process does not hold). A directory keeps one server's sessions across restarts; a Redis
    # URL lets replicas share them.
    session_dir: str = Field("~/.local/state/toyllm/sessions", description="Directory of stored sessions "
                             "(used unless session_store is set); empty: sessions live in memory only.")
    session_store: str | None = Field(None, description="redis://host:port/db: store sessions in Redis, "
                                      "shared by replicas (instead of session_dir).")
    session_lease_s: float = Field(30.0, gt=0, description="With Redis: how long a replica's hold on a "
                                   "session lasts unless renewed (renewed while its request runs; a dead "
                                   "replica's sessions are free again after it).")

    # Each client's share (its API key, the proxy's X-Client-ID, or its address: server/clients.py):
    # past it, its own least recently used idle sessions go, never another client's.
    client_max_sessions: int = Field(256, ge=1, description="Sessions one client may hold.")
    client_max_cache_bytes: int = Field(512 * 2**20, ge=1, description="Bytes of session tiers one client "
                                        "may hold (idle sessions).")

    @property
    def keys(self) -> set[str]:
        """Every API key the server accepts (none: no key is asked for)."""
        return {k for k in [self.api_key, *self.api_keys] if k}

    # Admission: at most max_concurrent_requests decode together; queue_size more may wait.
    max_concurrent_requests: int = Field(32, ge=1)
    queue_size: int = Field(64, ge=0)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(2048, ge=1, le=2048)
    max_body_bytes: int = Field(1_000_000, ge=1, description="Larger bodies get 413 (chunked uploads too).")
    api_key: str | None = None
    api_keys: list[str] = Field(default_factory=list, description="More API keys (JSON list), one per client: "
                                "each key's sessions are its own.")
    drain_s: float = Field(30.0, ge=0, description="On SIGTERM: how long requests already in may go on "
                                                   "before they end with 'the server is shutting down'.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins browsers may call the API "
                                    "from (CORS); none by default. `[\"*\"]` allows any.")
    trusted_proxy: bool = Field(False, description="A routing proxy is in front (deploy/nginx): honour its "
                                "X-New-Session-ID header, which names the id of a session it creates. Never "
                                "set it when clients reach the server directly.")

    # Engine.
    steps_per_call: int = Field(4, ge=1, le=64, description="Decode steps per jitted call (fewer host "
                                                            "round trips; tokens arrive in bursts).")
    max_prefill_chunk: int = Field(512, ge=16, description="Longest prefill chunk (a power of two).")
    prefill_window: int | None = Field(None, ge=16, description="Prompt tokens a compressing cache takes "
                                       "in between two compressions of a prefill [default: "
                                       "max_prompt_tokens + cache_slack: every prompt is compressed once, "
                                       "whole, so the policy sees its question]. Smaller keeps smaller "
                                       "prefill caches but compresses long prompts before their end.")
    prefill_state_bytes: int = Field(1 << 30, ge=1, description="Cache bytes for the prompts prefilling at "
                                     "once, per cache class (each holds a prefill cache of kept slots + "
                                     "prefill window); sets how many prefill together (at least one).")
    interleave_chunk: int = Field(64, ge=16, description="Longest prefill chunk while other streams "
                                  "decode (a power of two): a long prompt is admitted in such pieces "
                                  "between decode calls.")
    interleave_tokens: int = Field(256, ge=1, description="Prompt tokens of short new prompts (up to 256 "
                                   "tokens each) prefilled together between two decode calls while streams "
                                   "decode (at least one prompt).")
    warmup: bool = Field(True, description="Compile the serving shapes before /ready answers 200.")
    compile_cache_dir: str = Field("~/.cache/toyllm/xla", description="Where the warm-up keeps the programs it "
                                   "builds, whole, so that the next start loads them instead of tracing and "
                                   "compiling them; empty: off. Keep it private: it is trusted.")
