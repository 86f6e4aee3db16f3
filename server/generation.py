"""What /generate and /v1/completions share: cache configs, prompt checks, and the bridge that
carries the engine thread's events into an async iterator on the event loop."""

from __future__ import annotations

import asyncio

from toyllm_core.serving.engine import CacheClass
from toyllm_core.serving.policies import Policy, make_policy
from toyllm_core.serving.sampling import SamplingParams
from toyllm_core.tokenizer import token_bytes

from .engine import EngineStopped, Failed, Finished, GenerationRequest, QueueFull
from .errors import bad_request, queue_full, unavailable, unsupported
from .schemas import CacheSpec
from .sessions import Session
from .state import ServerState


def cache_policy(state: ServerState, spec: CacheSpec | None) -> Policy:
    """The policy a request's `cache` names (fields left out: the server default's, under the same
    policy, else the policy's own defaults); 422 with the allowed values unless it is warmed."""
    default = state.default_policy
    if spec is None:
        return default
    fields = spec.model_dump(exclude_none=True)
    name = fields.pop("policy", default.name)
    allowed = "; ".join(p.label for p in state.policies)
    try:
        policy = make_policy(name, **{**(default.params if name == default.name else {}), **fields})
    except ValueError as e:
        raise unsupported(f"cache: {e}; this server accepts: {allowed}") from None
    if policy not in state.policies:
        raise unsupported(f"cache: {policy.label} is not among this server's cache classes (it compiles "
                          f"only those at start-up); use one of: {allowed}")
    return policy


def named_session(in_body: str | None, in_header: str | None) -> str | None:
    """The session a request names, in its body or in the X-Session-ID header (a routing proxy's
    clients send the header); 400 when they differ."""
    if in_body and in_header and in_body != in_header:
        raise bad_request("session_id in the body and the X-Session-ID header differ")
    return in_body or in_header


def tokenize(state: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    return check_prompt(state, state.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def check_prompt(state: ServerState, ids: list[int]) -> list[int]:
    """The prompt's token ids, once they are known to fit the model and the server (400 otherwise)."""
    if not ids:
        raise bad_request("the prompt tokenizes to nothing")
    vocab = state.model.cfg.vocab_size
    if max(ids) >= vocab:  # a random-weight preset smaller than its stand-in tokenizer
        raise bad_request(f"the prompt has token ids past the model's vocabulary ({vocab})")
    limit = state.settings.max_prompt_tokens
    if len(ids) > limit:
        raise bad_request(f"the prompt has {len(ids)} tokens, more than max_prompt_tokens={limit}")
    return ids


def request_class(state: ServerState, session: Session, prompt_tokens: int, max_new_tokens: int) -> CacheClass:
    """The class a request runs in (400 when it cannot be served): a compressing session's own; for
    the full cache, the smallest full class that holds the session, the prompt and max_new_tokens."""
    if max_new_tokens > state.settings.max_new_tokens:
        raise bad_request(f"max_new_tokens={max_new_tokens} is more than this server allows "
                          f"({state.settings.max_new_tokens})")
    if session.policy.evicts:
        return session.cls
    # +1: a continued session feeds its last generated token first.
    total = session.tokens_in_cache + (session.pending is not None) + prompt_tokens + max_new_tokens
    for cls in state.classes_of(session.policy):
        if cls.tokens >= total and cls.capacity >= session.cls.capacity:
            return cls
    limit = max(c.tokens for c in state.classes_of(session.policy))
    raise bad_request(
        f"the session's {len(session.tokens)} tokens + the prompt's {prompt_tokens} + max_new_tokens "
        f"{max_new_tokens} = {total} exceed the model context ({limit}) under the full cache; "
        "shorten the prompt, lower max_new_tokens, or use a compressing cache policy")


def sampling_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                    stop: list[str], ignore_eos: bool = False, eos_id: int | None = None,
                    top_logprobs: int = 0) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=tuple(stop), ignore_eos=ignore_eos, eos_id=eos_id,
                              top_logprobs=top_logprobs).validate()
    except ValueError as e:
        raise bad_request(str(e)) from None


def token_text(state: ServerState, token: int) -> str:
    """One token's text on its own (a log-probability's label). A token that holds only part of a
    UTF-8 character (byte-level BPE splits some characters across tokens) is labelled as OpenAI
    labels it, `bytes:\\xe6\\x9d`: decoded alone it would be U+FFFD."""
    texts = state.token_texts
    if token not in texts:
        text = state.tokenizer.decode([token])
        raw = token_bytes(state.tokenizer, token) if "\ufffd" in text else None
        if raw is not None and not _is_utf8(raw):
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        texts[token] = text
    return texts[token]


def token_raw_bytes(state: ServerState, token: int) -> bytes:
    """A token's bytes (what OpenAI's logprobs `bytes` lists): a partial character's own bytes."""
    raw = token_bytes(state.tokenizer, token)
    return raw if raw is not None else state.tokenizer.decode([token]).encode()


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class EventStream:
    """The events of one generation, delivered from the engine thread to the event loop."""

    def __init__(self, state: ServerState, session: Session, cls: CacheClass, prompt_ids: list[int],
                 sampling: SamplingParams, ephemeral: bool = False, chat: list[dict] | None = None):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.engine = state.engine
        self.request = GenerationRequest(session, cls, prompt_ids, sampling, self._sink, ephemeral=ephemeral,
                                         chat=chat)
        self.finished = False

    def _sink(self, event) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def submit(self) -> EventStream:
        try:
            self.engine.submit(self.request)
        except QueueFull as e:
            raise queue_full(f"the server is at capacity: {e}") from None
        except EngineStopped as e:
            raise unavailable(str(e)) from None
        return self

    async def next(self):
        event = await self._queue.get()
        if isinstance(event, Finished | Failed):
            self.finished = True
        return event

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        return await self.next()

    def cancel(self) -> None:
        """The client went away: stop generating at the next decode step and free the session."""
        if not self.finished:
            self.request.cancel()
            self.engine.wake()
