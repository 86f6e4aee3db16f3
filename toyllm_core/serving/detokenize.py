"""Incremental detokenization with stop strings, for streaming text token by token.

Byte-level BPE splits multi-byte characters across tokens, so a token's text is only final once
the characters around it are: decode a short window of recent tokens and emit what it adds, holding
back a trailing U+FFFD (an incomplete character). Text that might be the start of a stop string is
held back until it is known not to be one. Special tokens (end-of-text, chat markers) add no text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextStream:
    tokenizer: object
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far (stop string excluded once stopped)
    emitted: int = 0  # characters of `text` already handed out
    stopped: bool = False
    _prefix: int = 0  # ids[_prefix:_read] were decoded into text already, as context
    _read: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now safe to emit (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The text still held back, at the end of generation."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            self.text += self._decode(self.ids[self._prefix :])[len(before) :]
            self._read = len(self.ids)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _release(self) -> str:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
                break
        hold = 0
        if not self.stopped:
            # Keep back the longest tail that is a proper prefix of some stop string.
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
        end = len(self.text) - hold
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out
