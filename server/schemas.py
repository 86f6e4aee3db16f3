"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from toyllm_core.serving.policies import policy_class, policy_names
from toyllm_core.serving.sampling import TOP_LOGPROBS

SEED_LIMIT = 2**64  # seeds are 64-bit: [0, 2^64)


def _cache_spec() -> type[BaseModel]:
    """A session's cache configuration, generated from the registered policies' parameters (`param`
    in toyllm_core/serving/policies/base.py): each parameter once, optional (left out: the server's
    default), within the bounds its policy declares (the widest where policies share a name). Only
    the server's warmed cache classes are accepted in the end (422 otherwise)."""
    params: dict[str, dict] = {}
    for name in policy_names():
        for f in dataclasses.fields(policy_class(name)):
            if not f.init or "doc" not in f.metadata:
                continue
            m, seen = f.metadata, params.get(f.name)
            if seen is None:
                params[f.name] = dict(m)
            else:  # the widest bounds of the policies that share it
                seen["ge"] = None if None in (seen["ge"], m["ge"]) else min(seen["ge"], m["ge"])
                seen["le"] = None if None in (seen["le"], m["le"]) else max(seen["le"], m["le"])
    fields = {"policy": (Literal[tuple(policy_names())] | None, None)}
    for name, m in params.items():
        kind = Literal[m["choices"]] if m["choices"] else int
        fields[name] = (kind | None, Field(None, ge=m["ge"], le=m["le"], description=m["doc"]))
    return create_model("CacheSpec", __config__=ConfigDict(extra="forbid"),
                        __doc__="A session's cache configuration; fields left out take the server's defaults.",
                        **fields)


CacheSpec = _cache_spec()


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    session_id: str | None = Field(None, max_length=64, description="Continue this session's cached context.")
    max_new_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(1.0, ge=0, le=100, description="0 = greedy.")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="0 = off; at least the vocabulary size is off too.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="64-bit sampling seed (used whole).")
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=4,
                                                                            description="Up to 4 stop strings.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token (load tests, "
                                                "benchmarks: every request makes max_new_tokens tokens).")
    top_logprobs: int = Field(0, ge=0, le=TOP_LOGPROBS, description="Each token event also lists this many "
                              "likeliest tokens with their log-probabilities.")
    stream: bool = True
    cache: CacheSpec | None = Field(None, description="Fixed when the session is created.")


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache: CacheSpec | None = None


class SessionCreated(BaseModel):
    session_id: str


class CacheStats(BaseModel):
    policy: str
    budget: int | None  # None under `full`
    tokens_seen: int
    tokens_kept: int
    bytes: int
    full_bytes: int
    compression_ratio: float
    tokens_cold: int = 0  # in the cold tier, per layer and KV head
    hot_bytes: int = 0
    cold_bytes: int = 0
    reselections: int = 0  # turns that chose the hot set again over hot and cold
    tokens_recalled: float = 0.0  # brought back from cold to hot, per layer and KV head, over every turn
    compressions: int = 0  # of the session's hot cache, over every turn
    tokens_evicted: int = 0  # from the hot cache, per layer and KV head, over every compression


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_s: float
    prefill_s: float
    ttft_s: float
    total_s: float
    tokens_per_s: float


class GenerateDone(BaseModel):
    session_id: str | None
    generated_text: str
    finish_reason: Literal["length", "stop", "eos", "cancelled"]
    usage: Usage
    cache: CacheStats
    timings: Timings


class SessionMemory(BaseModel):
    """Where an idle session stands on the memory-pressure ladder (server/pressure.py)."""

    state: Literal["resident", "compressed", "demoted"]
    hot_bits: int | None  # its hot tier's keys and values: 16 (as the cache stores them), 8 or 4
    cold_bits: int | None  # its cold tier's (None: no cold tier)


class SessionInfo(BaseModel):
    session_id: str
    created_at: float
    last_used_at: float
    busy: bool
    turns: int
    cache: CacheStats
    cache_config: dict
    memory: SessionMemory


class KeptSlot(BaseModel):
    position: int
    token_id: int
    text: str


class KeptHead(BaseModel):
    layer: int
    kv_head: int
    kept: list[KeptSlot]  # the hot tier: what decoding attends to
    cold: list[int] = Field(default_factory=list, description="Positions the cold tier holds (quantised, in host "
                            "memory; a later turn may bring them back).")


class SessionCache(BaseModel):
    session_id: str
    policy: str
    tokens_seen: int
    tokens_kept: int = 0  # hot, per layer and KV head
    tokens_cold: int = 0  # cold, per layer and KV head
    hot_bytes: int = 0
    cold_bytes: int = 0
    heads: list[KeptHead]


class SessionRetention(BaseModel):
    """What a session's cache keeps of each token, compact (the playground reads it after each turn).
    Arrays are base64 of little-endian unsigned integers of `count_bytes` bytes (1 or 2)."""

    session_id: str
    tokens: int  # positions 0 .. tokens - 1
    layers: int
    kv_heads: int
    count_bytes: int = Field(description="Bytes per count in `hot` and `cold`: 1, or 2 past 255 (layer, KV head) pairs.")
    hot: str = Field(description="Per token: how many (layer, KV head) pairs keep it in the hot tier.")
    cold: str = Field(description="Per token: how many (layer, KV head) pairs hold it in the cold tier.")
    map: str = Field(description="[layers, map_columns] bytes, row-major: the share (0..255) of the KV heads, "
                     "and of the positions binned into the column, that keep it hot.")
    map_columns: int
    texts_from: int
    texts: list[str] = Field(description="Each token's text, from position texts_from on.")


# ------------------------------------------------------------------- OpenAI-compatible subset
# Every field OpenAI defines for these routes is either implemented or, where this server has no
# such feature, accepted only at the value that means "off" (anything else: 422 naming it). Fields
# OpenAI does not define are refused (422 names them) rather than silently ignored.
SEED = Field(None, ge=0, lt=SEED_LIMIT, description="64-bit sampling seed (used whole).")
TOP_K = Field(0, ge=-1, le=2**31 - 1, description="Extension (as vLLM): keep the k likeliest tokens; 0 or -1 "
                                                  "= off; at least the vocabulary size is off too.")


def _neutral(field: str, value, neutral):
    if value is not None and value != neutral:
        raise ValueError(f"{field} is not supported by this server: leave it out or send {neutral!r}")
    return value


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with the usage (and no choices).")


class OpenAIRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = TOP_K
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="A stop string, or up to 4.")
    seed: int | None = SEED
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Not supported: 0 or left out.")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="Not supported: 0 or left out.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: empty or left out.")
    user: str | None = Field(None, max_length=256, description="The end user, for the client's own records.")
    # Extensions (as vLLM and llama.cpp's server have them).
    ignore_eos: bool = Field(False, description="An extension: keep generating past the end-of-text token "
                             "(benchmarks: every request makes max_tokens tokens).")
    cache: CacheSpec | None = Field(None, description="An extension, as /generate's: the cache a stateless request "
                                    "runs under (one of the server's cache classes, e.g. {\"policy\": \"full\"}); "
                                    "a session's is fixed when it is created.")

    @field_validator("frequency_penalty", "presence_penalty", mode="before")
    @classmethod
    def _no_penalties(cls, value, info):
        return _neutral(info.field_name, value, 0)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, value):
        return _neutral("logit_bias", value or None, None)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def top_k_value(self) -> int:
        return max(self.top_k, 0)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = Annotated[str, Field(min_length=1)]


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)] = Field(
        description="One prompt (a string, or a list holding one).")
    max_tokens: int = Field(16, ge=1, le=2048)
    echo: bool = Field(False, description="The answer's text starts with the prompt (with logprobs: its tokens "
                                          "too, their log-probabilities null: they are not computed).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the generated tokens and "
                                                              "of this many likeliest alternatives per token.")
    best_of: int | None = Field(None, ge=1, le=1, description="Not supported: 1 or left out.")
    suffix: str | None = Field(None, max_length=0, description="Not supported: empty or left out.")

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, value):
        return _neutral("best_of", value, 1)

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, value):
        return _neutral("suffix", value or None, None)

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# Text that reaches the tokenizer. A length constraint (any, even none at all as here) makes pydantic
# check the string as Unicode, as it does /generate's and /v1/completions' prompts: a lone surrogate
# (JSON "\ud800") is then a 422 naming the field, not a tokenizer crash (500).
Text = Annotated[str, Field(min_length=0)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions; `session_id` (an extension) continues a chat kept in a session."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2048, description="Default 256.")
    max_completion_tokens: int | None = Field(None, ge=1, le=2048, description="The newer name of max_tokens.")
    logprobs: bool = Field(False, description="Log-probabilities of the reply's tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS, description="This many likeliest alternatives "
                                     "per token (implies logprobs).")
    session_id: str | None = Field(None, max_length=64, description="Continue this session's chat: only the "
                                   "messages it does not hold yet are prefilled, against its cache.")
    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or bool(self.top_logprobs)

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    @property
    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text} for m in self.messages]
