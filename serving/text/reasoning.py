"""`<think>…</think>` reasoning split from the answer, incrementally (`--reasoning-parser`).

Models in the DeepSeek-R1 and Qwen3 style write their reasoning between `<think>` and `</think>` and
then the answer. Some templates open the block themselves (DeepSeek-R1's ends the prompt with
`<think>\\n`; Qwen3's with `enable_thinking=false` writes an empty, closed block), so where the output
starts is decided from the rendered prompt (`starts_in_reasoning`), never guessed from the output:

- `deepseek-r1` (aliases `default`, `qwen-qwq`, `intern-s1`): the output starts inside the reasoning
  unless the prompt closed the block or asked for no thinking (`enable_thinking=false`), as LMDeploy's
  default parser does;
- `qwen3`: the output starts in the answer unless the prompt left a block open; a `<think>` the model
  writes first opens one.

Either way a `<think>` at the very start of the output is dropped, `</think>` ends the reasoning (and
the whitespace right after it is dropped), and tags never leak into either field, even when a chunk
boundary splits them: a tail that could begin a tag is held back until it can be decided.
"""

from __future__ import annotations

from typing import Literal

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

Kind = Literal["reasoning", "content"]
Piece = tuple[Kind, str]

REASONING_PARSERS = ("deepseek-r1", "qwen3")
ALIASES = {"default": "deepseek-r1", "qwen-qwq": "deepseek-r1", "intern-s1": "deepseek-r1"}


def parser_name(name: str) -> str:
    """The canonical name of a `--reasoning-parser` value; ValueError for an unknown one."""
    canonical = ALIASES.get(name, name)
    if canonical not in REASONING_PARSERS:
        known = ", ".join((*REASONING_PARSERS, *ALIASES))
        raise ValueError(f"unknown reasoning parser {name!r}; known: {known}")
    return canonical


def starts_in_reasoning(name: str, prompt: str, enable_thinking: bool | None) -> bool:
    """Whether the output of a prompt rendered to `prompt` starts inside a think block."""
    opened, closed = prompt.rfind(OPEN_TAG), prompt.rfind(CLOSE_TAG)
    if opened > closed and not prompt[opened + len(OPEN_TAG):].count("<|im_start|>"):
        return True  # the template opened the block for the model
    if name == "qwen3":
        return False
    # deepseek-r1: thinking unless the prompt just closed a block or the request turned thinking off
    tail_closed = closed >= 0 and not prompt[closed + len(CLOSE_TAG):].strip()
    return enable_thinking is not False and not tail_closed


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningParser:
    """Feed it text deltas; it returns ("reasoning" | "content", text) pieces in order."""

    def __init__(self, in_reasoning: bool):
        self._in_reasoning = in_reasoning
        self._at_start = True  # nothing but whitespace seen yet: a leading <think> may still come
        self._skip_space = False  # right after a tag: whitespace before the text is dropped
        self._buffer = ""

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while self._buffer:
            if self._at_start:
                stripped = self._buffer.lstrip()
                if stripped.startswith(OPEN_TAG):
                    self._buffer = stripped[len(OPEN_TAG):]
                    self._in_reasoning, self._at_start, self._skip_space = True, False, True
                    continue
                if OPEN_TAG.startswith(stripped):  # only whitespace, or the tag's beginning: wait
                    return pieces
                self._at_start = False
                self._skip_space = self._in_reasoning  # a block the template opened
            if self._skip_space:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return pieces
                self._skip_space = False
            if not self._in_reasoning:
                pieces.append(("content", self._buffer))
                self._buffer = ""
                return pieces
            end = self._buffer.find(CLOSE_TAG)
            if end < 0:
                keep = len(self._buffer) - _held_prefix(self._buffer, CLOSE_TAG)
                if keep:
                    pieces.append(("reasoning", self._buffer[:keep]))
                self._buffer = self._buffer[keep:]
                return pieces
            if end:
                pieces.append(("reasoning", self._buffer[:end]))
            self._buffer = self._buffer[end + len(CLOSE_TAG):]
            self._in_reasoning, self._skip_space = False, True
        return pieces

    def finish(self) -> list[Piece]:
        """Whatever was held back, at the end of the output."""
        text, self._buffer = self._buffer, ""
        if self._skip_space or (self._at_start and self._in_reasoning):
            text = text.lstrip()
        return [("reasoning" if self._in_reasoning else "content", text)] if text else []
