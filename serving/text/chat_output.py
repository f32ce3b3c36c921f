"""One choice's generated text → reasoning, content and tool calls, incrementally.

The text goes through the reasoning parser first (reasoning is never searched for tool calls), then
its content through the tool-call parser. A streamed choice and an answered one use the same parser,
fed in pieces or whole, and get the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serving.text.reasoning import ReasoningParser
from serving.text.tool_parsers import ToolCall, ToolCallStream, ToolFormat


@dataclass(frozen=True)
class OutputEvent:
    kind: Literal["reasoning", "content", "call", "arguments"]
    text: str = ""  # reasoning, content or argument text; the function name for "call"
    index: int = 0  # the tool call's index, for "call" and "arguments"


class ChatOutputParser:
    """`reasoning` splits off `<think>` blocks; `tools` finds tool calls (both optional).

    `call_prefix` is text the prompt already wrote for the model (a forced call start): it is read as
    the beginning of the output but never emitted. `max_calls` keeps only the first calls
    (`parallel_tool_calls=false`, a named `tool_choice`).
    """

    def __init__(
        self,
        reasoning: ReasoningParser | None = None,
        tools: ToolFormat | None = None,
        call_prefix: str = "",
        max_calls: int | None = None,
    ):
        self._reasoning = reasoning
        self._tools = ToolCallStream(tools) if tools is not None else None
        self._max_calls = max_calls
        if call_prefix:
            if self._tools is None:
                raise ValueError("a forced call prefix needs a tool call parser")
            self._tools.feed(call_prefix)

    @property
    def calls(self) -> list[ToolCall]:
        calls = self._tools.calls if self._tools is not None else []
        return calls[: self._max_calls] if self._max_calls is not None else calls

    def feed(self, text: str) -> list[OutputEvent]:
        if self._reasoning is None:
            return self._content(text)
        return self._split(self._reasoning.feed(text))

    def finish(self) -> list[OutputEvent]:
        events = self._split(self._reasoning.finish()) if self._reasoning is not None else []
        if self._tools is not None:
            events += self._tool_events(self._tools.finish())
        return events

    def _split(self, pieces: list[tuple[str, str]]) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        for kind, text in pieces:
            events += [OutputEvent("reasoning", text)] if kind == "reasoning" else self._content(text)
        return events

    def _content(self, text: str) -> list[OutputEvent]:
        if self._tools is None:
            return [OutputEvent("content", text)] if text else []
        return self._tool_events(self._tools.feed(text))

    def _tool_events(self, events: list[tuple]) -> list[OutputEvent]:
        out = []
        for event in events:
            if event[0] == "content":
                out.append(OutputEvent("content", event[1]))
            elif self._max_calls is None or event[1] < self._max_calls:
                out.append(OutputEvent(event[0], event[2], event[1]))
        return out


def collect_text(events: list[OutputEvent]) -> tuple[str | None, str | None]:
    """(content, reasoning) joined from events; None where there was none."""
    content = "".join(e.text for e in events if e.kind == "content")
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    return content or None, reasoning or None
