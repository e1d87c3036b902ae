"""Committed tokens -> text for the client: UTF-8 safe, with stop strings applied.

A message's text is released only when it is complete: not ending inside a multi-byte character, and not a
possible beginning of a stop string. Token ids are released together with their text, so each message's tokens
and text describe the same span. When a stop string matches, the text before it is released with the tokens
that lie wholly before it, and the stream is over.

Knows nothing about gRPC or models beyond a tokenizer's `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

_INCOMPLETE = "\ufffd"  # what decode yields for the bytes of an unfinished character


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    stopped: bool = False


class TextStreamer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._pending: list[int] = []
        self.emitted_tokens = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int]) -> Chunk:
        """Takes newly committed tokens; returns what can be released now."""
        if self.stopped:
            return Chunk([], "", True)
        self._pending.extend(token_ids)
        text = self._decode(self._pending)
        if self.stop:
            hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if hit >= 0:
                self.stopped = True
                return self._release_upto(hit, text, stopped=True)
        if text.endswith(_INCOMPLETE):
            return Chunk([], "")
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        if hold == 0:
            return self._release_all(text)
        return self._release_upto(len(text) - hold, text)

    def flush(self) -> Chunk:
        """At the end of the stream: everything still held."""
        if self.stopped or not self._pending:
            return Chunk([], "", self.stopped)
        return self._release_all(self._decode(self._pending))

    def _release_all(self, text: str) -> Chunk:
        ids, self._pending = self._pending, []
        self.emitted_tokens += len(ids)
        return Chunk(ids, text)

    def _release_upto(self, end: int, text_all: str, stopped: bool = False) -> Chunk:
        """Releases the longest run of whole tokens whose text ends at or before character `end`."""
        count, text = 0, ""
        for n in range(1, len(self._pending) + 1):
            candidate = self._decode(self._pending[:n])
            if len(candidate) > end or candidate.endswith(_INCOMPLETE):
                break
            count, text = n, candidate
        ids, self._pending = self._pending[:count], self._pending[count:]
        self.emitted_tokens += count
        if stopped:
            # all text before the stop string is output, even the part inside the token where the stop begins
            return Chunk(ids, text_all[:end], True)
        return Chunk(ids, text)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
