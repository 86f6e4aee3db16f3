"""Cache classes: the fixed geometries the engine decodes in.

A cache class is a policy with its parameters plus the shapes that serve it: `slots` decode rows of
`capacity` slots each, and the capacity a prompt is prefilled into. A compressing policy's rows
hold `kept_slots + slack` slots (decoding compresses when they fill; `kept_slots` is the budget
unless the policy spreads it unevenly over heads or layers); its prefill cache has room for the
kept slots plus one chunk. A full cache's class holds up to `tokens` tokens (a few such classes up to
the model context; a session moves up to a larger one as it grows). Every shape the engine will
ever compile follows from the classes in closed form (see `programs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policies import EvictingPolicy, Policy
from ..signals import merge

# Smallest prefill chunk. Every class keeps this much headroom past what its tokens need, so that
# the last piece of a prompt can always be padded to a compiled chunk size.
MIN_CHUNK = 16

# A session with a cold tier prefills the last this many tokens of a new turn's prompt (its
# question, and the template's reply header) against hot ∪ cold, so that the queries which choose
# the next hot set were computed over the whole history. At least SnapKV's largest observation window.
RECALL_TAIL = 128


# A prompt chunk or a decode call attends over the first `span` slots of its rows: the smallest
# compiled span that holds what they have filled plus what the call adds, not the whole capacity
# (a 64-token prompt in a class of 6,176 slots read 96x the keys it needed). Spans grow by 4x from
# MIN_SPAN, and the capacity is the last; a span is compiled only if it is at most half the
# capacity (a program that saves less is not worth its compile).
MIN_SPAN = 256
SPAN_GROWTH = 4


def spans(capacity: int, growth: int = SPAN_GROWTH) -> list[int]:
    """The compiled attention spans of rows of `capacity` slots."""
    sizes, n = [], MIN_SPAN
    while n * growth <= 2 * capacity and n < capacity:  # at 4x: spans of at most half the capacity
        sizes.append(n)
        n *= growth
    return sizes + [capacity]


def span_for(capacity: int, needed: int, growth: int = SPAN_GROWTH) -> int:
    """The smallest compiled span that holds `needed` slots (at most the capacity)."""
    return next(s for s in spans(capacity, growth) if s >= needed)



# Short new prompts prefill together (`Engine.prefill_short`): up to MAX_BATCH_ROWS prompts of at
# most SHORT_PROMPT tokens in one call, so that a burst of arrivals shares the weight reads and the
# call overheads. They fill a batch cache of SHORT_PROMPT slots per row that records every class's
# signals; each row then moves into its own class's decode slot.
SHORT_PROMPT = 256
MAX_BATCH_ROWS = 16


def batch_sizes(max_rows: int) -> list[int]:
    """The compiled row counts of a short-prompt batch."""
    return row_buckets(min(MAX_BATCH_ROWS, max_rows))


def batch_chunks() -> list[int]:
    """The compiled prompt lengths of a short-prompt batch (every prompt whole, padded to the longest)."""
    return chunk_sizes(SHORT_PROMPT)


def batch_signals(classes) -> tuple:
    """The signals a short-prompt batch records for `classes`: every one their policies ask for, at
    the largest size asked (a row then keeps its class's own: `KVCache.with_signals`)."""
    return merge(w for c in classes for w in c.policy.signals)


def chunk_sizes(max_chunk: int) -> list[int]:
    """The compiled prefill chunk lengths: powers of two from MIN_CHUNK to max_chunk."""
    if max_chunk < MIN_CHUNK or max_chunk & (max_chunk - 1):
        raise ValueError(f"max_chunk must be a power of two >= {MIN_CHUNK}, not {max_chunk}")
    sizes, n = [], MIN_CHUNK
    while n <= max_chunk:
        sizes.append(n)
        n *= 2
    return sizes


def row_buckets(slots: int) -> list[int]:
    """Decode batch sizes compiled for a class: powers of two below `slots`, and `slots`. A decode call
    runs the smallest one that covers the occupied rows (they are kept packed at the front)."""
    sizes, n = [], 1
    while n < slots:
        sizes.append(n)
        n *= 2
    return sizes + [slots]


def row_bucket(slots: int, occupied: int) -> int:
    """The compiled batch size a decode call runs for `occupied` packed rows."""
    return next(b for b in row_buckets(slots) if b >= occupied)


@dataclass(frozen=True)
class CacheClass:
    policy: Policy
    slots: int  # decode rows
    capacity: int  # cache slots per row while decoding (and in an idle session)
    prefill_capacity: int  # cache slots a prompt is prefilled into
    max_chunk: int  # the longest prefill chunk
    tokens: int | None = None  # full cache: the most tokens a sequence of this class may hold
    prefill_window: int = 0  # compressing: prompt tokens taken in between compressions of a prefill
    prefill_rows: int = 1  # prompts of this class that may prefill at once (each holds a prefill cache)
    cold_tokens: int = 0  # the most cold-tier entries a session keeps per layer and KV head (0: no tier)

    @staticmethod
    def make(policy: Policy, slots: int, max_chunk: int, tokens: int | None = None,
             prefill_window: int | None = None, prefill_rows: int = 1, cold_tokens: int = 8192) -> CacheClass:
        """`prefill_window` (compressing policies): prompt tokens taken in between two compressions
        of a prefill [default: `max_chunk`]. A larger window keeps a larger prefill cache (one row,
        kept slots + window) and lets the policy see more of the prompt, up to all of it, before it
        chooses; the decode rows are the same size either way. `cold_tokens`: the bound of a
        session's cold tier, when the policy has one (its `cold_bits`)."""
        if prefill_rows < 1:
            raise ValueError("a cache class needs at least one prefill row")
        chunk_sizes(max_chunk)  # validates
        if slots < 1:
            raise ValueError("a cache class needs at least one slot")
        if isinstance(policy, EvictingPolicy):
            if policy.slack > max_chunk:
                raise ValueError(f"slack ({policy.slack}) must not exceed the prefill chunk ({max_chunk})")
            window = max_chunk if prefill_window is None else prefill_window
            if window < max_chunk:
                raise ValueError(f"the prefill window ({window}) must not be shorter than the chunk ({max_chunk})")
            # A reconstructing policy's prefill cache has room for one reconstruction piece past the prompt.
            scratch = max_chunk if policy.reconstructs else 0
            return CacheClass(policy, slots, policy.trigger, policy.kept_slots + window + MIN_CHUNK + scratch, max_chunk,
                              prefill_window=window, prefill_rows=prefill_rows,
                              cold_tokens=cold_tokens if policy.cold_bits else 0)
        if tokens is None or tokens < 1:
            raise ValueError("a full-cache class needs its token limit")
        return CacheClass(policy, slots, tokens + MIN_CHUNK, tokens + MIN_CHUNK, max_chunk, tokens,
                          prefill_rows=prefill_rows)

    @property
    def evicts(self) -> bool:
        return self.policy.evicts

    @property
    def name(self) -> str:
        return self.policy.label if self.tokens is None else f"{self.policy.label}-{self.tokens}"

    @property
    def tiered(self) -> bool:
        """Whether its sessions keep what the hot cache evicts in a cold tier."""
        return self.cold_tokens > 0

    @property
    def cold_buckets(self) -> list[int]:
        """The lengths a session's cold tier is uploaded at (a tiered class)."""
        from ..tiers import cold_buckets

        return cold_buckets(self.cold_tokens) if self.tiered else []

    @property
    def recall_capacity(self) -> int:
        """Slots of a recalled prefill cache (a tiered class): the prefill cache, the largest cold
        bucket, and the prompt's last RECALL_TAIL tokens."""
        return self.prefill_capacity + self.cold_buckets[-1] + RECALL_TAIL if self.tiered else 0

    @property
    def prefill_spans(self) -> list[int]:
        """The compiled attention spans of the prefill cache."""
        return spans(self.prefill_capacity)

    def prefill_span(self, needed: int) -> int:
        """The smallest compiled prefill span that holds `needed` slots."""
        return next(s for s in self.prefill_spans if s >= needed)

    @property
    def reconstruct_spans(self) -> list[int]:
        """A reconstructing class's spans for its reconstruction pieces (`max_chunk` tokens each):
        every multiple of `max_chunk`, and the capacity. Each piece's queries attend over the whole
        context, so the 4x spans of a prompt chunk would waste up to 4x of its attention (a
        4,096-token context read 7,712 slots) where these waste at most one piece."""
        if not self.policy.reconstructs:
            return []
        return list(range(self.max_chunk, self.prefill_capacity, self.max_chunk)) + [self.prefill_capacity]

    def takes_short(self, n_tokens: int) -> bool:
        """Whether a new prompt of n_tokens (no session cache) may prefill in a short-prompt batch:
        it fits the batch cache, and this class keeps all of it (nothing to compress)."""
        limit = self.policy.budget if self.evicts else self.tokens
        return n_tokens <= min(SHORT_PROMPT, limit, self.capacity)

    @property
    def tail_chunk(self) -> int:
        """The longest chunk of a prompt's last tokens prefilled against hot ∪ cold."""
        return min(RECALL_TAIL, self.max_chunk)

    def memory(self, bytes_per_token: int) -> dict:
        """What the class allocates, in bytes: the decode slots (held from the first row on), the prefill
        caches of the prompts prefilling at once, and a new turn's recalled cache (hot ∪ cold at the
        largest cold bucket; both transient)."""
        reselect = self.recall_capacity
        return {"decode_bytes": self.slots * self.capacity * bytes_per_token,
                "prefill_bytes_per_row": self.prefill_capacity * bytes_per_token,
                "prefill_bytes": self.prefill_rows * self.prefill_capacity * bytes_per_token,
                "reselect_bytes": reselect * bytes_per_token}

    def describe(self, bytes_per_token: int | None = None) -> dict:
        out = {"name": self.name, **self.policy.describe(), "slots": self.slots, "capacity": self.capacity,
               "max_tokens": self.tokens, "prefill_capacity": self.prefill_capacity,
               "prefill_window": self.prefill_window if self.evicts else None, "prefill_rows": self.prefill_rows,
               "cold_tokens": self.cold_tokens,
               "cache": self.policy.describe()}  # what a request names to run in this class
        if bytes_per_token is not None:
            out.update(self.memory(bytes_per_token))
        return out


@dataclass(frozen=True)
class Piece:
    """One prefill step: compress first (the prefill cache is full), then run `real` prompt tokens
    padded to the compiled length `padded`."""

    real: int
    padded: int
    compress_first: bool


def next_piece(cls: CacheClass, length: int, remaining: int, limit: int) -> Piece:
    """The next piece of a prompt with `remaining` tokens left, on a prefill cache holding `length`,
    taking at most `limit` tokens (smaller while other rows decode).

    A compressing policy compresses when its prefill cache holds kept slots + prefill window tokens, and after
    the prompt's last piece: the points where it compresses depend on token counts only, never on
    `limit`, so a prompt keeps the same tokens whether it was prefilled alone or beside decoding rows.
    """
    compress_first = False
    real = min(remaining, limit, cls.max_chunk)
    if cls.evicts:
        full_at = cls.policy.kept_slots + cls.prefill_window
        if length >= full_at:
            compress_first, length = True, cls.policy.kept_slots
        real = min(real, full_at - length)
    padded = max(MIN_CHUNK, 1 << (real - 1).bit_length())
    if length + padded > cls.prefill_capacity:
        # Padding would overflow: an exact power-of-two piece (>= MIN_CHUNK, by the headroom).
        real = padded = 1 << (real.bit_length() - 1)
    return Piece(real, padded, compress_first)


def plan_classes(policies: list[Policy], bytes_per_token: int, max_running: int, state_bytes: int,
                 max_chunk: int, full_tokens: list[int], prefill_window: int | None = None,
                 prefill_bytes: int | None = None, cold_tokens: int = 8192) -> list[CacheClass]:
    """The classes a server warms: one per compressing policy, and one per token limit in
    `full_tokens` for the full cache (if it is among `policies`). Each class gets as many decode
    slots as `state_bytes` of cache allow, between 1 and `max_running`, and as many prefill rows
    (prompts prefilling at once) as `prefill_bytes` allow [default: `state_bytes`], at least one."""
    prefill_bytes = state_bytes if prefill_bytes is None else prefill_bytes
    classes = []
    for policy in dict.fromkeys(policies):  # de-duplicated, in order
        limits = [None] if policy.evicts else sorted(set(full_tokens))
        for tokens in limits:
            probe = CacheClass.make(policy, 1, max_chunk, tokens, prefill_window)
            slots = max(1, min(max_running, state_bytes // (probe.capacity * bytes_per_token)))
            rows = max(1, min(max_running, prefill_bytes // (probe.prefill_capacity * bytes_per_token)))
            classes.append(CacheClass.make(policy, slots, max_chunk, tokens, prefill_window, rows, cold_tokens))
    return classes
