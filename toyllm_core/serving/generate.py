"""Generation without a server: several prompts decoded together through one `Engine`.

The CLI (`toyllm generate`) and the tests use it; the server drives the same engine itself, with
prefill interleaved with decoding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .engine import CacheClass, Engine
from .engine import Sequence as Seq
from .model import ToyLLM
from .policies import Policy
from .sampling import SamplingParams


@dataclass
class Generated:
    token: int
    logprob: float
    seq: Seq


def classes_for(model: ToyLLM, policies: Sequence[Policy], max_chunk: int = 512) -> dict[Policy, CacheClass]:
    """One cache class per distinct policy, with a slot for each prompt under it (a full cache holds
    up to the model context)."""
    counts: dict[Policy, int] = {}
    for p in policies:
        counts[p] = counts.get(p, 0) + 1
    tokens = model.cfg.context_length
    return {p: CacheClass.make(p, n, max_chunk, None if p.evicts else tokens) for p, n in counts.items()}


def generate_tokens(model: ToyLLM, prompts: Sequence[Sequence[int]], policies: Sequence[Policy],
                    sampling: Sequence[SamplingParams], steps_per_call: int = 8,
                    max_chunk: int = 512) -> Iterator[Generated]:
    """Decode several prompts together (each with its own policy and sampling) and yield tokens as
    they are made. Stop strings are the caller's business (see `detokenize.TextStream`); a caller
    that stops a sequence early sets `seq.remaining = 0`."""
    for prompt, policy, params in zip(prompts, policies, sampling, strict=True):
        policy.validate()
        params.validate()
        if not policy.evicts and len(prompt) + params.max_new_tokens > model.cfg.context_length:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model context ({model.cfg.context_length}) under the full cache; use a compressing policy")
    classes = classes_for(model, policies, max_chunk)
    engine = Engine(model, list(classes.values()), steps_per_call=steps_per_call)
    running = []
    for prompt, policy, params in zip(prompts, policies, sampling, strict=True):
        seq = engine.run_prefill(prompt, classes[policy], params)
        running.append(seq)
        yield Generated(seq.pending, seq.first_logprob, seq)
    while any(s.active for s in running):
        for out in engine.step():
            for token, logprob in zip(out.tokens, out.logprobs, strict=True):
                yield Generated(token, logprob, out.seq)
