"""What /generate and /v1/completions share: cache configs, prompt checks, and the bridge that
carries the engine thread's events into an async iterator on the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from toyllm_core.generate import SamplingParams
from toyllm_core.policies import CacheConfig, get_policy

from .engine import EngineStopped, Failed, Finished, GenerationRequest, QueueFull
from .errors import bad_request, queue_full, unavailable
from .schemas import CacheSpec
from .sessions import Session
from .state import ServerState


def cache_config(state: ServerState, spec: CacheSpec | None) -> CacheConfig:
    """The server's default cache config with the request's fields on top; 400 if invalid."""
    cfg = state.default_cache
    if spec is not None:
        changes = {k: v for k, v in spec.model_dump().items() if v is not None}
        cfg = replace(cfg, **changes)
    try:
        get_policy(cfg.policy)
        return cfg.validate()
    except ValueError as e:
        raise bad_request(f"cache: {e}") from None


def tokenize(state: ServerState, text: str) -> list[int]:
    ids = state.tokenizer(text, verbose=False)["input_ids"]
    if not ids:
        raise bad_request("the prompt tokenizes to nothing")
    limit = state.settings.max_prompt_tokens
    if len(ids) > limit:
        raise bad_request(f"the prompt has {len(ids)} tokens, more than max_prompt_tokens={limit}")
    return ids


def check_fits(state: ServerState, session: Session, prompt_tokens: int, max_new_tokens: int) -> None:
    """400 when the request cannot be served: too many new tokens, or a full cache past the context."""
    if max_new_tokens > state.settings.max_new_tokens:
        raise bad_request(f"max_new_tokens={max_new_tokens} is more than this server allows "
                          f"({state.settings.max_new_tokens})")
    if session.cache_cfg.evicts:
        return
    context = state.model.cfg.context_length
    total = len(session.tokens) + prompt_tokens + max_new_tokens
    if total > context:
        raise bad_request(
            f"the session's {len(session.tokens)} tokens + the prompt's {prompt_tokens} + max_new_tokens "
            f"{max_new_tokens} = {total} exceed the model context ({context}) under the full cache; "
            "shorten the prompt, lower max_new_tokens, or use a compressing cache policy")


def sampling_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                    stop: list[str], ignore_eos: bool = False) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=tuple(stop), ignore_eos=ignore_eos).validate()
    except ValueError as e:
        raise bad_request(str(e)) from None


class EventStream:
    """The events of one generation, delivered from the engine thread to the event loop."""

    def __init__(self, state: ServerState, session: Session, prompt_ids: list[int], sampling: SamplingParams,
                 ephemeral: bool = False):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.engine = state.engine
        self.request = GenerationRequest(session, prompt_ids, sampling, self._sink, ephemeral=ephemeral)
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
