"""Incremental detokenization: token ids in, newly finished text out.

Decoding token by token does not work: SentencePiece tokenizers drop the leading space of whatever
token comes first, and a character split over byte-fallback (or byte-level BPE) tokens decodes to
U+FFFD until its last byte arrives. So, as vLLM does, keep two offsets into the ids:

    ids[prefix:read]   a few tokens already emitted, decoded again only as context
    ids[read:]         tokens whose text has not been emitted yet

and each step decode `ids[prefix:]`, emit what it adds beyond `decode(ids[prefix:read])`, then slide
both offsets forward. Both decodes start at the same token, so whatever the decoder does to a first
token happens to both and cancels out. Text ending in U+FFFD is held back: it is an unfinished
character until more tokens say otherwise. The work per token is bounded by the window, not by the
length of the sequence.
"""

from __future__ import annotations

from serving.text.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context in front of the first generated token (vLLM uses the same).
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes and every token carries at least one, so a character still
# waiting for its last byte lies within the last 3 tokens. Text that still ends in U+FFFD with more
# tokens than that pending is invalid bytes, not an unfinished character (see `_emit_before_tail`).
MAX_UNFINISHED_CHAR_TOKENS = 3


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text, a piece at a time.

    `push(ids)` returns only text that is final; `flush()` returns whatever is left at the end
    (including a U+FFFD for bytes that never formed a character, as a one-shot decode would).
    For valid UTF-8 the pieces joined equal `tokenizer.decode(prompt + generated)` minus the prompt's
    own text. (Invalid bytes mid-stream come out as U+FFFDs, but not always as many as a one-shot
    decode shows: a byte-fallback decoder replaces a whole run of bytes when any of it is invalid,
    which only a decoder that waits for the end of the run could reproduce.)

    `spaces_between_special_tokens` is accepted for LMDeploy/vLLM compatibility; it only ever changed
    the output of slow (pure Python) tokenizers, and `Tokenizer` always wraps a fast one, whose
    decoder writes special tokens exactly as `decode` does.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        # Skipped special tokens produce no text, and the decoder drops them before it runs, so
        # dropping them here gives the same text while keeping long runs of them out of the window.
        self._skip_ids = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        # Only the prompt's last few tokens matter, as context for the first generated ones.
        context: list[int] = []
        for token_id in reversed(prompt_ids):
            if len(context) == PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._skip_ids:
                context.append(token_id)
        self._ids = context[::-1]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        # The context must not begin inside a character: a byte-fallback decoder turns a whole run of
        # byte tokens into U+FFFDs when any of it is invalid, which would spoil the generated text too.
        while self._prefix < self._read and self._prefix_text.startswith(REPLACEMENT_CHAR):
            self._prefix += 1
            self._prefix_text = self._decode(self._prefix, self._read)

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text that became final (possibly "")."""
        self._ids.extend(i for i in new_ids if i not in self._skip_ids)
        end = len(self._ids)
        if end == self._read:
            return ""
        text = self._decode(self._prefix, end)
        if text.endswith(REPLACEMENT_CHAR):
            if end - self._read <= MAX_UNFINISHED_CHAR_TOKENS:
                return ""
            end, text = self._emit_before_tail(end)
        return self._advance(end, text)

    def flush(self) -> str:
        """Return all text not yet emitted; call once when the sequence has finished."""
        end = len(self._ids)
        if end == self._read:
            return ""
        return self._advance(end, self._decode(self._prefix, end))

    def _decode(self, start: int, end: int) -> str:
        # Special tokens left in `_ids` are the ones the caller wants to see.
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=False)

    def _advance(self, end: int, text: str) -> str:
        """Emit `text` beyond the context's text and make `ids[read:end]` the next context."""
        # Text that did not grow (tokens that decode to nothing) moves no offset: starting the next
        # window at a token with no text would let the decoder strip the space of the token after it.
        if len(text) <= len(self._prefix_text):
            return ""
        delta = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, end
        self._prefix_text = self._decode(self._prefix, self._read)
        return delta

    def _emit_before_tail(self, end: int) -> tuple[int, str]:
        """Pending text ends in U+FFFD but spans too many tokens to be one unfinished character.

        Several tokens arrived at once, or the model produced invalid bytes. Emit up to the last
        token boundary within the final 3 tokens where the text ends in a whole character; if there
        is none, the bytes before those 3 tokens can never become a character, so emit them as
        U+FFFD. Either way the window stays bounded when a model loops on stray bytes.
        """
        for cut in range(end - 1, end - MAX_UNFINISHED_CHAR_TOKENS, -1):
            text = self._decode(self._prefix, cut)
            if not text.endswith(REPLACEMENT_CHAR):
                return cut, text
        cut = end - MAX_UNFINISHED_CHAR_TOKENS
        return cut, self._decode(self._prefix, cut)
