"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CacheSpec(BaseModel):
    """A session's cache configuration; fields left out take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(None, description="full, streaming, snapkv or h2o.")
    budget: int | None = Field(None, ge=1, le=65536)
    sink_size: int | None = Field(None, ge=0)
    window_size: int | None = Field(None, ge=0)
    slack: int | None = Field(None, ge=1, le=4096)
    obs_window: int | None = Field(None, ge=1)
    pool_kernel: int | None = Field(None, ge=1)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    session_id: str | None = Field(None, description="Continue this session's cached context.")
    max_new_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(1.0, ge=0, le=100, description="0 = greedy.")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="0 = off; at least the vocabulary size is off too.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="64-bit sampling seed.")
    stop: list[str] = Field(default_factory=list, max_length=4)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token (load tests, "
                                                "benchmarks: every request makes max_new_tokens tokens).")
    stream: bool = True
    cache: CacheSpec | None = Field(None, description="Fixed when the session is created.")

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop


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
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    cache: CacheStats
    timings: Timings


class SessionInfo(BaseModel):
    session_id: str
    created_at: float
    last_used_at: float
    busy: bool
    turns: int
    cache: CacheStats
    cache_config: dict


class KeptSlot(BaseModel):
    position: int
    token_id: int
    text: str


class KeptHead(BaseModel):
    layer: int
    kv_head: int
    kept: list[KeptSlot]


class SessionCache(BaseModel):
    session_id: str
    policy: str
    tokens_seen: int
    heads: list[KeptHead]


# ------------------------------------------------------------------- OpenAI-compatible subset
class CompletionRequest(BaseModel):
    """POST /v1/completions: the fields standard clients send; unsupported ones are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=2048)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="64-bit sampling seed.")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=0)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt is supported")
        text = prompt if isinstance(prompt, str) else prompt[0]
        if not text:
            raise ValueError("prompt must be non-empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return stops


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions; `session_id` (an extension) continues a chat kept in a session."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2048, description="Default 256.")
    max_completion_tokens: int | None = Field(None, ge=1, le=2048, description="The newer name of max_tokens.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="64-bit sampling seed.")
    logprobs: bool = Field(False, description="Not supported: must be false.")
    user: str | None = None
    session_id: str | None = Field(None, description="Continue this session's chat: only the messages it does "
                                                     "not hold yet are prefilled, against its cache.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool) -> bool:
        if logprobs:
            raise ValueError("logprobs are not supported")
        return logprobs

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    @property
    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text} for m in self.messages]

    stop_list = CompletionRequest.stop_list
