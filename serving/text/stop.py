"""Stop strings, matched on the text stream rather than on tokens.

A stop string can span any number of tokens, and a token can hold the end of one stop string and the
start of more text, so matching runs on text: each piece is appended to a small held-back tail and
scanned. Whatever could still turn out to be the start of a stop string stays held back, so text
that belongs to a stop string is never streamed to the client before the match is known.
"""

from __future__ import annotations


class StopStringMatcher:
    """Streams text through, stopping at the first stop string.

    "First" means the one completed earliest in the text (what a character-by-character scan would
    see), so the result does not depend on how the text was split into pieces; if two complete at
    the same character, the longer wins. With `include_stop_str` the stop string itself is emitted.
    """

    def __init__(self, stop_words: list[str], include_stop_str: bool = False):
        if any(not word for word in stop_words):
            raise ValueError("stop strings must be non-empty")
        self._stop_words = list(dict.fromkeys(stop_words))
        self._include = include_stop_str
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string has ended the stream)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        match = self._earliest_match(buffer)
        if match is not None:
            start, end = match
            self.stopped = True
            self._held = ""
            return buffer[: end if self._include else start], True
        keep = self._longest_partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The stream ended without a stop string: release the held-back tail."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest_match(self, buffer: str) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for word in self._stop_words:
            start = buffer.find(word)
            if start < 0:
                continue
            end = start + len(word)
            # Ordered by where the match ends, then by where it starts (earlier start = longer).
            if best is None or (end, start) < (best[1], best[0]):
                best = (start, end)
        return best

    def _longest_partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        keep = 0
        for word in self._stop_words:
            # Only the last len(word) - 1 characters can begin an unfinished copy of `word`, and
            # such a copy must begin with word's first character: let str.find jump between those.
            first = len(buffer) - len(word) + 1
            i = buffer.find(word[0], max(first, 0))
            while i >= 0 and len(buffer) - i > keep:
                if word.startswith(buffer[i:]):
                    keep = len(buffer) - i
                    break
                i = buffer.find(word[0], i + 1)
        return keep
