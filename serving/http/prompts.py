"""Requests → prompt token ids: chat messages through the chat template, completion prompts as given.

Runs on the prompt preparation pool (`serving.http.preparation`: templates and tokenizers are
CPU-bound, and a long prompt would stall every stream on the event loop). A template that refuses the
conversation (e.g. "roles must alternate") is the client's 400, not a server error, and so is a
`chat_template_kwargs` entry that is not a plain template variable. A final assistant message is
continued, not closed (as in LMDeploy): the model writes the rest of that turn. Prompts are encoded
with a token limit (`Tokenizer.encode_at_most`), so one too long for the session costs little to refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2

from serving.http.errors import APIError
from serving.http.protocol import ChatMessage
from serving.text.templates import ChatTemplate, end_of_turn_words
from serving.text.tokenizer import TemplateVariableError, Tokenizer


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
    max_tokens: int | None = None,
) -> ChatPrompt:
    """Render and encode; `continuation` is text appended after the generation prompt (a forced tool
    call's start), encoded with it. With `max_tokens`, PromptTooLong for a longer prompt."""
    continues = messages[-1].role == "assistant"
    try:
        text = tokenizer.apply_chat_template(
            [_template_message(m) for m in messages],
            add_generation_prompt=not continues,
            continue_final_message=continues,
            tools=tools,
            chat_template=chat_template.source if chat_template is not None else None,
            variables=template_kwargs,
        )
    except TemplateVariableError as error:
        param = f"chat_template_kwargs.{error.name}"
        raise APIError(400, f"{param}: {error}", param=param, code="invalid_template_variable") from None
    except (jinja2.TemplateError, ValueError) as error:
        raise APIError(400, f"the chat template refused these messages: {error}", param="messages") from error
    except TypeError as error:  # a template given a variable of a type it cannot use
        if not template_kwargs:
            raise
        raise APIError(400, f"the chat template cannot use these chat_template_kwargs: {error}",
                       param="chat_template_kwargs", code="invalid_template_variable") from error
    text += continuation
    # The template writes the BOS and other special tokens itself.
    if max_tokens is None:
        return ChatPrompt(text, tokenizer.encode(text, add_special_tokens=False))
    return ChatPrompt(text, tokenizer.encode_at_most(text, max_tokens, add_special_tokens=False))


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
    tokenizer: Tokenizer, prompt: str | list[str] | list[int] | list[list[int]], max_tokens: int
) -> list[list[int]]:
    """One token-id list per prompt: strings are encoded with the tokenizer's BOS, ids used as given;
    PromptTooLong for a string of more than `max_tokens` tokens."""
    return [tokenizer.encode_at_most(p, max_tokens) if isinstance(p, str) else list(p) for p in _prompts(prompt)]


def completion_prompt_chars(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """The characters of a completion request's text prompts: what preparing them costs."""
    return sum(len(p) for p in _prompts(prompt) if isinstance(p, str))


def messages_chars(messages: list[ChatMessage]) -> int:
    """The characters of a conversation's texts: about what rendering and encoding it costs."""
    return sum(len(m.text() or "") for m in messages)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    # A string or a flat id list is one prompt; a list of strings or of id lists is several.
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt


def turn_end_ids(tokenizer: Tokenizer, template: ChatTemplate | None) -> frozenset[int]:
    """Token ids that end an assistant turn in this template: they stop a chat answer like an EOS."""
    words = template.stop_words if template is not None else end_of_turn_words(tokenizer.chat_template or "")
    return frozenset(token for token in map(tokenizer.token_id, words) if token is not None)
