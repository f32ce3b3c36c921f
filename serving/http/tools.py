"""`tools` and `tool_choice` → what the prompt gets and how the answer is read and checked.

- `auto` (the default with tools): tools are rendered; the answer is parsed for calls.
- `none`: tools are still rendered (the conversation may mention them), nothing is parsed.
- `required` / a named function: enforced. The template's own call opening (`<tool_call>\\n{"name": "`,
  and for a named function its name and `"arguments": ` too) is appended to the prompt, so decoding
  starts inside a call and, for a named function, inside that function's arguments. The answer is
  then checked: it must be a call (to that function / to one of the tools), otherwise the request
  fails with 422 `tool_choice_unsatisfied` rather than returning text the client did not ask for.
  A named choice renders only that tool and keeps one call. Reasoning is skipped: the call starts at once.

`parallel_tool_calls: false` keeps only the first call. Tools need the server's `--tool-call-parser`
(400 otherwise), which knows the model's call format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.http.errors import APIError
from serving.http.protocol import ChatCompletionRequest, NamedToolChoice
from serving.text.tool_parsers import ToolCall, ToolFormat, tool_format


@dataclass(frozen=True)
class ToolPlan:
    format: ToolFormat | None = None  # None: the answer is not parsed for calls
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt
    call_prefix: str = ""  # written after the generation prompt (an enforced call's start)
    allowed: frozenset[str] | None = None  # enforced: the answer must call these
    max_calls: int | None = None

    def check(self, calls: list[ToolCall], started_with_call: bool) -> None:
        """Raise 422 if an enforced choice did not get its call."""
        if self.allowed is None:
            return
        wrong = [call.name for call in calls if call.name not in self.allowed]
        if calls and started_with_call and not wrong:
            return
        expected = ", ".join(sorted(self.allowed))
        found = f"called {', '.join(wrong)}" if wrong else "did not write a well-formed call"
        raise APIError(
            422,
            f"tool_choice required a call to {expected}, but the model {found}; retry, or use tool_choice auto",
            param="tool_choice",
            code="tool_choice_unsatisfied",
        )


def plan_tools(body: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs `tools`", param="tool_choice")
        return ToolPlan()
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    if choice == "none":
        return ToolPlan(tools=tools)
    if parser is None:
        raise APIError(
            400,
            "this server reads no tool calls: start it with --tool-call-parser (qwen, internlm or llama3)",
            param="tools",
        )
    fmt = tool_format(parser)
    max_calls = 1 if body.parallel_tool_calls is False else None
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        named = [tool for tool in tools if tool["function"]["name"] == name]
        if not named:
            raise APIError(400, f"tool_choice names {name!r}, which is not among `tools`", param="tool_choice")
        return ToolPlan(fmt, named, fmt.call_prefix(name), frozenset([name]), 1)
    if choice == "required":
        names = frozenset(tool["function"]["name"] for tool in tools)
        return ToolPlan(fmt, tools, fmt.call_prefix(None), names, max_calls)
    return ToolPlan(fmt, tools, max_calls=max_calls)
