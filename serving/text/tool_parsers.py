"""Tool calls in model output, parsed incrementally (`--tool-call-parser`).

Three formats, one state machine:

- `qwen` (aliases `hermes`, `qwen2_5`, `qwen3`): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`;
- `internlm` (`internlm2`): `<|action_start|><|plugin|>\\n{"name": "f", "parameters": {...}}<|action_end|>`,
  where `<|action_end|>` is a stop word, so the text often just ends;
- `llama3`: `<|python_tag|>{"name": "f", "parameters": {...}}`, or the output itself starting with `{`;
  calls are separated by `;`.

Text outside calls is content. A call becomes a call once its header — `{"name": "<string>",
"arguments"|"parameters": {` — has been read: then its name is reported, and its arguments stream as
the model writes them, up to the `}` that closes them (so a client sees the name first, then argument
fragments). Like OpenAI's, the arguments are the model's text: valid JSON is not guaranteed once the
header has committed to a call (a length cut leaves them unfinished). A block whose header does not
read as one (keys in another order, say) is buffered to its end and taken as a call if it parses as a
JSON object with a name and arguments; anything else, including a block that never ends, stays plain
content, tags and all, so malformed output is returned as text, never dropped and never an error.

The result depends only on the text, not on how it was cut into deltas: `ToolCallStream.feed` holds
back any tail that could still begin a tag or complete a header. Whitespace between content and a
call, and between calls, is dropped; an output without calls keeps its text exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import regex

# `{"name": "...", "arguments": ` (or "parameters"), followed by the arguments object's `{`.
_HEADER = regex.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(\{)?')
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start_tags: tuple[str, ...]
    end_tag: str | None  # None: a call runs to `separator` or the end of the text
    arguments_key: str  # the key this format's prompts use (and a forced call prefix writes)
    opening: str  # how the chat templates write a call's start, before its JSON
    separator: str | None = None
    bare_json: bool = False  # llama3: an output (or a call after `;`) that starts with `{` is a call
    special_tokens: bool = False  # the tags are special tokens: decode without skipping them

    def call_prefix(self, name: str | None) -> str:
        """The text that starts a call (to `name`, when given): appended to the prompt, it makes the
        model's next tokens a call's remainder (`tool_choice` required or a named function)."""
        prefix = self.opening + '{"name": "'
        if name is not None:
            prefix += f'{json.dumps(name)[1:-1]}", "{self.arguments_key}": '
        return prefix


TOOL_FORMATS = {
    "qwen": ToolFormat("qwen", ("<tool_call>",), "</tool_call>", "arguments", "<tool_call>\n"),
    "internlm": ToolFormat(
        "internlm", ("<|action_start|><|plugin|>",), "<|action_end|>", "parameters",
        "<|action_start|><|plugin|>\n", special_tokens=True,
    ),
    "llama3": ToolFormat(
        "llama3", ("<|python_tag|>",), None, "parameters", "", separator=";", bare_json=True, special_tokens=True
    ),
}
ALIASES = {"hermes": "qwen", "qwen2_5": "qwen", "qwen3": "qwen", "internlm2": "internlm"}


def tool_format(name: str) -> ToolFormat:
    """The format of a `--tool-call-parser` value; ValueError for an unknown one."""
    canonical = ALIASES.get(name, name)
    if canonical not in TOOL_FORMATS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join((*TOOL_FORMATS, *ALIASES))}")
    return TOOL_FORMATS[canonical]


@dataclass
class ToolCall:
    name: str
    arguments: str  # the model's JSON text


# ("content", text) | ("call", index, name) | ("arguments", index, text)
Event = tuple[Literal["content"], str] | tuple[Literal["call", "arguments"], int, str]

_TEXT, _HEADER_STATE, _ARGUMENTS, _AFTER, _FALLBACK = "text", "header", "arguments", "after", "fallback"


def _held_prefix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for size in range(min(len(text), len(tag) - 1), best, -1):
            if tag.startswith(text[-size:]):
                best = size
                break
    return best


class ToolCallStream:
    """Feed text deltas; get content and call events. `calls` holds every call found so far."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._state = _TEXT
        self._buffer = ""
        self._tag = ""  # the start tag of the block being read, and the whitespace dropped before it
        self._space_before = ""
        self._json_may_start = fmt.bare_json  # at the output's start, or right after a separator
        self._pending_space = ""  # whitespace after content, emitted only if more content follows
        self._depth = 0  # arguments scanning: nesting depth, inside a string, after a backslash
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            before = (self._state, self._buffer)
            getattr(self, f"_on_{self._state}")(events, final=False)
            if (self._state, self._buffer) == before:
                return events

    def finish(self) -> list[Event]:
        """The end of the text: settle whatever is held back."""
        events: list[Event] = []
        while self._buffer or self._state not in (_TEXT, _ARGUMENTS):
            getattr(self, f"_on_{self._state}")(events, final=True)
        if self._pending_space and not self.calls:
            events.append(("content", self._pending_space))
        self._pending_space = ""
        return events

    # ----- states: each consumes what it can decide; without `final` it may wait for more text ----
    def _on_text(self, events: list[Event], final: bool) -> None:
        fmt, text = self.fmt, self._buffer
        if self._json_may_start:
            stripped = text.lstrip()
            if not stripped and not final:
                return
            if stripped.startswith("{"):
                self._open_block("", stripped, self._pending_space + text[: len(text) - len(stripped)])
                return
            self._json_may_start = False
        found = [(text.find(tag), tag) for tag in fmt.start_tags if tag in text]
        if found:
            at, tag = min(found)
            head = text[:at]
            body = head.rstrip()
            if body:
                events.append(("content", self._pending_space + body))
                self._pending_space = ""
            self._open_block(tag, text[at + len(tag):], self._pending_space + head[len(body):])
            return
        keep = len(text) if final else len(text) - _held_prefix(text, fmt.start_tags)
        body = text[:keep].rstrip()
        if body:
            events.append(("content", self._pending_space + body))
            self._pending_space = ""
        self._pending_space += text[len(body):keep]
        self._buffer = text[keep:]

    def _on_header(self, events: list[Event], final: bool) -> None:
        match = _HEADER.match(self._buffer, partial=True)
        complete = match is not None and not match.partial and match.group(2) is not None
        if not complete:
            could_grow = match is not None and (match.partial or match.end() == len(self._buffer))
            if could_grow and not final:
                return
            self._state = _FALLBACK
            return
        name = json.loads(f'"{match.group(1)}"')
        self.calls.append(ToolCall(name, ""))
        events.append(("call", len(self.calls) - 1, name))
        self._buffer = self._buffer[match.start(2):]
        self._depth, self._in_string, self._escape = 0, False, False
        self._state = _ARGUMENTS

    def _on_arguments(self, events: list[Event], final: bool) -> None:
        end = self._scan(self._buffer)
        piece = self._buffer if end is None else self._buffer[:end]
        if piece:
            self.calls[-1].arguments += piece
            events.append(("arguments", len(self.calls) - 1, piece))
        self._buffer = "" if end is None else self._buffer[end:]
        if end is not None:
            self._state = _AFTER

    def _on_after(self, events: list[Event], final: bool) -> None:
        # The call object's `}`, then the end tag or separator; anything else is content again.
        rest = self._buffer.lstrip()
        if rest.startswith("}"):
            rest = rest[1:].lstrip()
        closers = [tag for tag in (self.fmt.end_tag, self.fmt.separator) if tag]
        for closer in closers:
            if rest.startswith(closer):
                self._buffer = rest[len(closer):]
                self._json_may_start = closer == self.fmt.separator
                self._state = _TEXT
                return
        if not final and (not rest or any(closer.startswith(rest) for closer in closers)):
            return
        self._buffer = rest
        self._state = _TEXT

    def _on_fallback(self, events: list[Event], final: bool) -> None:
        closers = [tag for tag in (self.fmt.end_tag, self.fmt.separator) if tag]
        ends = [(self._buffer.find(closer), closer) for closer in closers if closer in self._buffer]
        if ends:
            at, closer = min(ends)
            block, rest = self._buffer[:at], self._buffer[at + len(closer):]
        elif final:
            block, closer, rest = self._buffer, "", ""
        else:
            return
        call = _whole_call(block)
        if call is None:
            events.append(("content", self._space_before + self._tag + block + closer))
        else:
            self.calls.append(call)
            index = len(self.calls) - 1
            events += [("call", index, call.name), ("arguments", index, call.arguments)]
        self._json_may_start = self.fmt.bare_json and closer == self.fmt.separator
        self._buffer = rest
        self._state = _TEXT

    def _open_block(self, tag: str, rest: str, space_before: str) -> None:
        # Whitespace between content and a call is dropped (kept if the block turns out to be text).
        self._pending_space = ""
        self._json_may_start = False
        self._tag, self._space_before = tag, space_before
        self._buffer = rest
        self._state = _HEADER_STATE

    def _scan(self, text: str) -> int | None:
        """Index just past the `}` that closes the arguments object, or None if not in `text`."""
        for i, char in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _whole_call(block: str) -> ToolCall | None:
    """A complete block read as one JSON call object, or None."""
    try:
        data = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = next((data[key] for key in _ARGUMENT_KEYS if key in data), None)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))
