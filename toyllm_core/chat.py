"""Chat prompts: a checkpoint's Jinja chat template, rendered as transformers renders it.

The template is compiled once in jinja2's immutable sandbox with the options and helpers that
transformers' `apply_chat_template` gives it (trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`), so the prompt text is the one the model was tuned on.

A chat kept in a session is continued without re-rendering what its cache holds: `continuation`
is the text that turns the cached conversation (every earlier prompt and the generated replies)
into the rendering of the whole conversation plus the new messages.

`render_ids` and `continuation_ids` give the same prompts as token ids, with control tokens spelled
inside the messages (a user writing `<|im_end|>` to close its own turn and forge the next) encoded
as plain text: only the template's own markers are control tokens. This is transformers'
`apply_chat_template(..., sanitize_control_tokens=True)`: the messages' control-token spellings are
marked (`mark_control_tokens`) before rendering, and the tokenizer encodes the marked ones as text.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property, lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils.chat_template_utils import mark_control_tokens


class ChatTemplateError(ValueError):
    """A template that cannot be compiled, or that cannot render what it was asked to."""


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _any_of(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `tokens`, the longest first (a token before those it contains)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None
        self.source = source
        self.special_tokens = special_tokens or {}  # bos_token, eos_token, ... as the template sees them

    @classmethod
    def of(cls, tokenizer, source: str | None = None) -> ChatTemplate | None:
        """The tokenizer's own template (or `source` instead); None when there is neither."""
        source = source if source is not None else getattr(tokenizer, "chat_template", None)
        if not source:
            return None
        if isinstance(source, dict):  # several named templates: the default one
            source = source.get("default") or next(iter(source.values()))
        special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from None

    def continuation(self, history: list[dict], new: list[dict], reply_closed: str = "") -> str:
        """The text to prefill after a cached chat, so that the cache holds the rendering of
        `history + new` with a generation prompt.

        `history` ends with the assistant reply the cache holds as generated; `reply_closed` is the
        text of the token that ended that reply, if it was the template's end of turn (already in the
        cache, so not repeated).
        """
        if not history or history[-1].get("role") != "assistant":
            raise ChatTemplateError("a continued chat's history must end with the assistant's reply")
        prompted = self.render(history[:-1], add_generation_prompt=True)  # what was prefilled
        closed = self.render(history, add_generation_prompt=False)  # the template's finished turn
        whole = self.render(history + new, add_generation_prompt=True)
        reply = history[-1].get("content") or ""
        if not closed.startswith(prompted + reply) or not whole.startswith(closed):
            raise ChatTemplateError("this chat template does not render a conversation as the concatenation "
                                    "of its turns, so a session cannot continue it; send the whole "
                                    "conversation without a session_id")
        after_reply = closed[len(prompted) + len(reply):]
        if reply_closed and after_reply.startswith(reply_closed):
            after_reply = after_reply[len(reply_closed):]
        return after_reply + whole[len(closed):]

    def render_ids(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """`render` as token ids: control tokens written in the messages are encoded as plain text, only
        the template's own are control tokens (no special tokens added: the template places any BOS)."""
        return self._encode(tokenizer, self.render(self._marked(tokenizer, messages), add_generation_prompt))

    def continuation_ids(self, tokenizer, history: list[dict], new: list[dict], reply_closed: str = "") -> list[int]:
        """`continuation` as token ids, control tokens in the messages encoded as text (see `render_ids`)."""
        marked = self._marked(tokenizer, history + new)
        return self._encode(tokenizer, self.continuation(marked[:len(history)], marked[len(history):], reply_closed))

    def control_tokens(self, tokenizer) -> tuple[str, ...]:
        """The tokens that a message cannot write (transformers' choice for `sanitize_control_tokens`): the
        special tokens, and the other added tokens listed in `tokenizer.chat_control_tokens` or, when it
        lists none, those the template contains (whitespace tokens apart: templates write them as text)."""
        listed = getattr(tokenizer, "chat_control_tokens", None)
        return tuple(t.content for t in tokenizer.added_tokens_decoder.values()
                     if t.special or (t.content in listed if listed is not None
                                      else t.content in self.source and not t.content.isspace()))

    def _marked(self, tokenizer, messages: list[dict]) -> list[dict]:
        return mark_control_tokens(messages, _any_of(self.control_tokens(tokenizer)))

    @staticmethod
    def _encode(tokenizer, marked_text: str) -> list[int]:
        try:
            return tokenizer(marked_text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]
        except ValueError as e:  # a control token that plain text encodes to as well: it cannot be told apart
            raise ChatTemplateError(f"the messages cannot be tokenized safely: {e}") from None

    @cached_property
    def _probe(self) -> tuple[str, str]:
        """(prompt, finished turn) of a one-exchange chat: what the template puts after a reply."""
        user = [{"role": "user", "content": "Hi"}]
        return (self.render(user, True), self.render(user + [{"role": "assistant", "content": "Hello"}], False))

    def end_of_turn(self, tokenizer) -> int | None:
        """The special token the template puts right after an assistant reply (ChatML: <|im_end|>),
        which is where generation stops; None when it puts none there."""
        prompted, closed = self._probe
        if not closed.startswith(prompted + "Hello"):
            return None
        ids = tokenizer(closed[len(prompted) + len("Hello"):], add_special_tokens=False)["input_ids"]
        if ids and ids[0] in set(tokenizer.all_special_ids):
            return ids[0]
        return None
