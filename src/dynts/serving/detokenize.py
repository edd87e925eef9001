"""Text from a growing list of token ids, released as soon as it is final, and cut at the first stop string.

Decoding each token alone gets spaces and multi-byte characters wrong; decoding everything on every token costs
quadratic time. So the text is decoded from a short window: the tokens since the last released point, with a few
tokens before them as context, and a piece ending in an incomplete character (U+FFFD) waits for the next token.
A stop string may arrive split over several tokens, so the last (longest stop - 1) characters are held back
until they can no longer begin one.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # first token of the context window
        self.read = 0  # tokens whose text has been released

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """The new final text after these tokens ("" while a character is incomplete)."""
        self.ids.extend(int(t) for t in token_ids)
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        new = after[len(before) :] if after.startswith(before) else after
        if after.endswith(REPLACEMENT) or not new:  # an incomplete character, or a hidden (special) token: the
            return ""  # window keeps its context, so the next token's leading space is not lost
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """Whatever is left at the end of the sequence, incomplete characters included."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if after.startswith(before) else after


class StopStringText:
    """Text released up to (not including) the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, new: str) -> str:
        if self.stopped or not new:
            return ""
        search_from = max(0, len(self.text) - self.hold)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out


class TextChannel:
    """Token ids in, released text out, stopping at a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = StopStringText(stops)

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def push(self, token_ids: Sequence[int]) -> str:
        if self.stop.stopped:
            return ""
        return self.stop.push(self.detokenizer.push(token_ids))

    def flush(self) -> str:
        if self.stop.stopped:
            return ""
        out = self.stop.push(self.detokenizer.flush())
        return out + (self.stop.flush() if not self.stop.stopped else "")
