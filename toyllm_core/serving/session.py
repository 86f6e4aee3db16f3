"""A session: one conversation's state across turns, the one object the server, the evaluation and
the command line share.

It holds the token at every position seen (so kept positions can be shown as text), the last
generated token (sampled, not in the cache yet: the next turn feeds it first, so a conversation is
exactly the concatenation of its turns), the chat messages so far, and between turns both cache
tiers, in host memory: the hot cache that decoding attends to (parked with its live slots only:
`parking`) and, for a tiered class, the cold tier of what the hot cache evicted (`tiers.ColdTier`).
While a turn runs, the engine holds the tiers.

A turn through an `Engine`:

    job = session.begin(engine, prompt_ids, sampling)     # the engine takes the tiers
    ... engine.prefill(job) until True ...
    seq = engine.start(job); session.started(seq, prompt_ids)
    ... session.emitted(token) for each token the caller hands out ...
    session.finish(engine, seq)                           # the tiers come back (or are dropped)

`run_turn` does all of it for callers that do not interleave (evaluation, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import RECALL_TAIL, CacheClass, Engine, Prefill, Sequence
from .parking import ParkedRow, park, unpark
from .sampling import SamplingParams
from .tiers import ColdTier


class NotAChat(ValueError):
    """A chat turn for a session that holds raw text (or the other way round)."""


@dataclass(eq=False)
class Session:
    cls: CacheClass  # a full-cache session moves up to larger classes as it grows
    cache: ParkedRow | None = None  # the hot tier between turns, on the host; None before the first turn and while one runs
    length: int = 0  # live hot slots
    cold: ColdTier | None = None  # what the hot tier evicted (a tiered class), on the host
    tokens: list[int] = field(default_factory=list)  # token id at every original position seen
    pending: int | None = None  # last generated token, in `tokens` but not yet in the cache
    chat: list[dict] | None = None  # a chat session's messages so far, its replies included
    turns: int = 0
    compressions: int = 0
    tokens_evicted: int = 0  # per layer and KV head, over every compression
    reselections: int = 0
    tokens_recalled: float = 0.0  # brought back from cold per layer and KV head, over every re-selection
    cold_dropped: int = 0  # cold entries per layer and KV head dropped at the tier's bound
    reply_start: int | None = None  # position of the last turn's first generated token

    @property
    def policy(self):
        return self.cls.policy

    @property
    def tokens_in_cache(self) -> int:
        """Tokens written into the cache so far (what a full cache would hold)."""
        return len(self.tokens) - (self.pending is not None)

    @property
    def cold_tokens(self) -> int:
        """Cold entries per layer and KV head."""
        return self.cold.entries if self.cold is not None else 0

    def tier_bytes(self, bytes_per_token: int) -> dict[str, int]:
        """Bytes of each tier: the hot cache's keys and values, the cold tier's arrays."""
        hot = self.cache.kv_nbytes if self.cache is not None else self.length * bytes_per_token
        return {"hot": hot, "cold": self.cold.nbytes if self.cold is not None else 0}

    # ------------------------------------------------------------------------------- a turn
    def feed(self, prompt_ids: list[int]) -> list[int]:
        """What a turn prefills: the pending token, then the prompt."""
        return ([self.pending] if self.pending is not None else []) + list(prompt_ids)

    def rewind_to(self, cls: CacheClass) -> int | None:
        """Where a tiered session rewinds to at its next turn: the start of its last reply (at most
        RECALL_TAIL tokens back), or None. The reply's keys and values were computed while it was
        decoded against the hot set of its turn; the next turn prefills it again, within the tokens
        that see hot ∪ cold, so that what it holds is what a full cache would."""
        if not (cls.tiered and self.cold is not None and self.cold.length and self.reply_start is not None):
            return None
        start = max(self.reply_start, len(self.tokens) - RECALL_TAIL)
        return start if start < self.tokens_in_cache else None

    def begin(self, engine: Engine, prompt_ids: list[int], sampling: SamplingParams, cls: CacheClass | None = None,
              user: object = None) -> Prefill:
        """Start a turn: the engine takes the tiers and prefills pending + prompt (in class `cls`, a
        larger full class, when given); a tiered session first rewinds its last reply (`rewind_to`)
        and prefills it again before them."""
        cls = cls or self.cls
        rewind = self.rewind_to(cls)
        feed = self.feed(prompt_ids) if rewind is None else self.tokens[rewind:] + list(prompt_ids)
        before = rewind if rewind is not None else len(self.tokens) - (self.pending is not None)
        cache = unpark(self.cache, cls.prefill_capacity) if self.cache is not None else None
        cold = self.cold
        if cold is not None and cls.tiered and cold.bits != cls.policy.cold_bits:  # demoted under memory pressure
            cold = cold.requantized(cls.policy.cold_bits)
        job = engine.begin(feed, cls, sampling, cache, self.length, user=user, cold=cold,
                           rewind_to=rewind, history=self.tokens[:before] if cls.policy.reconstructs else None)
        self.cache, self.cold, self.cls = None, None, cls
        return job

    def started(self, seq: Sequence, prompt_ids: list[int]) -> None:
        """The prompt is in; the first token is `seq.pending` (not yet `emitted`)."""
        self.tokens.extend(prompt_ids)
        self.pending = None
        self.length = seq.length
        self.reply_start = len(self.tokens)

    def emitted(self, token: int) -> None:
        """A generated token the turn hands out (the next turn feeds the last one first)."""
        self.tokens.append(token)
        self.pending = token

    def finish(self, engine: Engine, seq: Sequence, keep: bool = True) -> None:
        """End the turn: the tiers come back from the engine (dropped unless `keep`)."""
        cache, self.length = engine.free(seq)
        self.pending = seq.pending
        self.turns += 1
        self.compressions += seq.compressions
        self.tokens_evicted += seq.tokens_evicted
        self.reselections += seq.reselections
        self.tokens_recalled += seq.recalled
        self.cold_dropped += seq.dropped
        if keep:
            self.cache, self.cold = park(cache), seq.cold_tier()

    def discard(self) -> None:
        """Forget the tiers (a failed turn: they cannot be trusted)."""
        self.cache, self.cold, self.length = None, None, 0

    def run_turn(self, engine: Engine, prompt_ids: list[int], sampling: SamplingParams) -> list[int]:
        """A whole turn, greedy or sampled as `sampling` says: the generated ids (the end-of-turn
        token included when it ended the turn)."""
        job = self.begin(engine, prompt_ids, sampling)
        while not engine.prefill(job):
            pass
        seq = engine.start(job)
        self.started(seq, prompt_ids)
        out = [seq.pending]
        while seq.active:
            for o in engine.step():
                out += o.tokens
        for token in out:
            self.emitted(token)
        self.finish(engine, seq)
        return out

    # ------------------------------------------------------------------------------- chat
    def chat_prompt(self, template, tokenizer, messages: list[dict], end_of_turn: int | None) -> tuple[list[int],
                                                                                                        list[dict]]:
        """(token ids to prefill, the messages the session holds once the turn is in).

        A new chat renders every message. A continued one renders only what the session does not
        hold: the caller may send the whole conversation (OpenAI style, the held messages are
        recognised and skipped) or only the new ones. Control tokens written in messages are plain
        text (`ChatTemplate.render_ids`)."""
        if not self.tokens:  # the template places any BOS itself
            return template.render_ids(tokenizer, messages), messages
        if self.chat is None:
            raise NotAChat("this session holds text that is not a chat (it was made by /generate); start a chat "
                           "in a new session")
        held = self.chat
        new = messages[len(held):] if messages[:len(held)] == held else messages
        if not new:
            raise NotAChat("the session already holds every message sent; add the next user message")
        closed = tokenizer.decode([self.pending]) if end_of_turn is not None and self.pending == end_of_turn else ""
        return template.continuation_ids(tokenizer, held, new, reply_closed=closed), held + new

    def replied(self, messages: list[dict], reply: str) -> None:
        """Keep a chat turn's messages and the reply to them."""
        self.chat = messages + [{"role": "assistant", "content": reply}]


# ------------------------------------------------------------------------------- what the cache keeps
MAP_COLUMNS = 256  # the retention map's width at most: positions are binned past it (bounds the route's size)


def retention(session: Session, columns: int = MAP_COLUMNS) -> dict[str, np.ndarray]:
    """What a session's tiers keep of each token, in counts (for the playground's views):
    `hot` [tokens] and `cold` [tokens]: how many (layer, KV head) pairs hold the token in each tier;
    `map` [layers, min(tokens, columns)] uint8: the share of KV heads (and of the positions binned
    into a column) that keep it hot, 0..255."""
    n = session.tokens_in_cache
    layers, kv = (session.cache.pos.shape[0], session.cache.pos.shape[2]) if session.cache is not None else (0, 0)
    hot_map = np.zeros((layers, n), np.int32)
    if session.cache is not None:
        pos = session.cache.pos[:, 0]  # [layers, kv, slots]
        for layer in range(layers):
            live = pos[layer][(pos[layer] >= 0) & (pos[layer] < n)]
            hot_map[layer] = np.bincount(live, minlength=n)[:n]
    cold = np.zeros(n, np.int32)
    if session.cold is not None and session.cold.length:
        live = session.cold.pos[(session.cold.pos >= 0) & (session.cold.pos < n)]
        cold = np.bincount(live, minlength=n)[:n].astype(np.int32)
    width = min(n, columns)
    edges = np.linspace(0, n, width + 1).astype(np.int64) if width else np.zeros(1, np.int64)
    sums = np.add.reduceat(hot_map, edges[:-1], axis=1) if width else np.zeros((layers, 0), np.int64)
    share = sums / np.maximum(1, kv * np.diff(edges))[None, :]
    return {"hot": hot_map.sum(axis=0), "cold": cold, "map": np.round(255 * share).astype(np.uint8)}
