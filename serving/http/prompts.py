"""Requests → prompt token ids: chat messages through the chat template, completion prompts as given.

Runs on a worker thread (templates and tokenizers are CPU-bound and a long prompt would stall every
stream on the event loop). A template that refuses the conversation (e.g. "roles must alternate")
is the client's 400, not a server error. A final assistant message is continued, not closed (as in
LMDeploy): the model writes the rest of that turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2

from serving.http.errors import APIError
from serving.http.protocol import ChatMessage
from serving.text.templates import ChatTemplate, end_of_turn_words
from serving.text.tokenizer import Tokenizer

# apply_chat_template's own arguments; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template", "continue_final_message"}
)


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]


def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    template_kwargs: dict[str, Any] | None,
    chat_template: ChatTemplate | None,
    tools: list[dict[str, Any]] | None = None,
    continuation: str = "",
) -> ChatPrompt:
    """Render and encode; `continuation` is text appended after the generation prompt (a forced tool
    call's start), encoded with it."""
    kwargs = dict(template_kwargs or {})
    clashing = sorted(_RESERVED_TEMPLATE_ARGS & kwargs.keys())
    if clashing:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clashing)}", param="chat_template_kwargs")
    if chat_template is not None:
        kwargs["chat_template"] = chat_template.source
    continues = messages[-1].role == "assistant"
    try:
        text = tokenizer.apply_chat_template(
            [_template_message(m) for m in messages],
            add_generation_prompt=not continues,
            continue_final_message=continues,
            tools=tools,
            **kwargs,
        )
    except (jinja2.TemplateError, ValueError) as error:
        raise APIError(400, f"the chat template refused these messages: {error}", param="messages") from error
    text += continuation
    # The template writes the BOS and other special tokens itself.
    return ChatPrompt(text, tokenizer.encode(text, add_special_tokens=False))


def _template_message(message: ChatMessage) -> dict[str, Any]:
    # Chat templates know system/user/assistant/tool; OpenAI's newer "developer" role is a system prompt.
    result: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": message.text() or "",
    }
    for name in ("name", "tool_call_id", "reasoning_content"):
        value = getattr(message, name)
        if value is not None:
            result[name] = value
    if message.tool_calls:
        # Templates write arguments with `tojson`: they expect the object, not the JSON text of it.
        result["tool_calls"] = [
            {"id": call.id, "type": call.type,
             "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
            for call in message.tool_calls
        ]  # fmt: skip
    return result


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # not JSON: the template gets the text as it came


def completion_prompt_ids(
    tokenizer: Tokenizer, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    """One token-id list per prompt: strings are encoded with the tokenizer's BOS, ids used as given."""
    # A string or a flat id list is one prompt; a list of strings or of id lists is several.
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


def turn_end_ids(tokenizer: Tokenizer, template: ChatTemplate | None) -> frozenset[int]:
    """Token ids that end an assistant turn in this template: they stop a chat answer like an EOS."""
    words = template.stop_words if template is not None else end_of_turn_words(tokenizer.chat_template or "")
    return frozenset(token for token in map(tokenizer.token_id, words) if token is not None)
