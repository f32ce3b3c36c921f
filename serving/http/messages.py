"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat path (`chat_run`).

`system` and `messages` (text, `tool_use`, `tool_result` and `thinking` blocks) become chat messages;
`tools` (`input_schema`), `tool_choice` (`auto`, `any`, `tool`, `none`), `max_tokens`, `stop_sequences`,
`temperature`, `top_p` and `top_k` become the chat request's. The answer's `content` holds a `thinking`
block (with the server's --reasoning-parser), a `text` block and one `tool_use` block per call;
`stop_reason` is `end_turn`, `max_tokens` or `tool_use`. With `stream: true` the answer is Anthropic's
event stream (`message_start` ... `message_stop`, each SSE event named by its type). Errors on these
routes come in Anthropic's envelope (`serving.http.errors`), and the API key may come as `x-api-key`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body, validation_error
from serving.http.chat_run import ChatRun, render_chat, run_streamed, run_whole, start_chat
from serving.http.engine_client import AsyncEngineClient
from serving.http.errors import APIError
from serving.http.openapi import streams
from serving.http.protocol import MAX_MESSAGES, MAX_STOP_LENGTH, MAX_STOP_STRINGS, ChatCompletionRequest, lax
from serving.http.sse import typed_sse_response
from serving.http.state import server_state
from serving.text.tool_parsers import ToolCall

blueprint = Blueprint("messages", __name__)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # as protocol's requests


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: (
        Annotated[
            Annotated[str, Tag("string")] | Annotated[list[TextBlock], Tag("parts")],
            Discriminator(lambda v: "string" if isinstance(v, str) else "parts"),
        ]
        | None
    ) = None
    is_error: bool | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(block.text for block in self.content)
        return self.content or ""


class ThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")],
    Discriminator(lambda v: v.get("type") if isinstance(v, dict) else getattr(v, "type", None)),
]


class Message(_Request):
    role: Literal["user", "assistant"]
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[Block], Tag("parts")],
        Discriminator(lambda v: "string" if isinstance(v, str) else "parts"),
    ]

    def blocks(self) -> list[Any]:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class Tool(_Request):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: lax(bool) | None = None


class CountTokensRequest(_Request):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: (
        Annotated[
            Annotated[str, Tag("string")] | Annotated[list[TextBlock], Tag("parts")],
            Discriminator(lambda v: "string" if isinstance(v, str) else "parts"),
        ]
        | None
    ) = None
    tools: list[Tool] | None = Field(None, description="Tools the model may call (needs --tool-call-parser).")
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: lax(int, ge=1) = Field(description="Most tokens to generate.")
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] | None = Field(
        None, max_length=MAX_STOP_STRINGS
    )
    temperature: lax(float, ge=0, le=2) | None = None
    top_p: lax(float, gt=0, le=1) | None = None
    top_k: lax(int, ge=0) | None = None
    stream: lax(bool) | None = False


class ResponseText(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ResponseThinking(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ResponseToolUse(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


StopReason = Literal["end_turn", "max_tokens", "tool_use"]


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ResponseThinking | ResponseText | ResponseToolUse]
    stop_reason: StopReason | None
    stop_sequence: None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    input_tokens: int


class AnthropicError(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicError


class MessageStreamEvent(BaseModel):
    """One event of a streamed message; the fields besides `type` depend on it (Anthropic's event types)."""

    model_config = ConfigDict(extra="allow")
    type: str


def _documented_errors(func: Any) -> Any:
    for status in (400, 401, 404, 408, 413, 422, 500, 503):
        func = document_response(AnthropicErrorResponse, status)(func)
    return func


@blueprint.post("/v1/messages")
@document_request(MessagesRequest)
@document_response(MessageResponse, 200)
@_documented_errors
@streams(MessageStreamEvent)
async def messages() -> Response | dict[str, Any]:
    """Create a message (Anthropic's Messages API)."""
    body = await read_body(MessagesRequest)
    state = server_state()
    state.require_model(body.model)
    message_id = f"msg_{uuid.uuid4().hex}"
    run = await start_chat(_chat_request(body), message_id)
    if body.stream:
        return typed_sse_response(_events(state.engine_client, run, message_id, body.model), _error_event)
    [out] = await run_whole(state.engine_client, run)
    content: list[ResponseThinking | ResponseText | ResponseToolUse] = []
    if out.reasoning:
        content.append(ResponseThinking(thinking=out.reasoning))
    if out.content or not out.calls:
        content.append(ResponseText(text=out.content or ""))
    content += [ResponseToolUse(id=_tool_use_id(), name=call.name, input=_input(call)) for call in out.calls]
    usage = MessageUsage(input_tokens=run.prompt_tokens - out.cached_tokens, output_tokens=out.completion_tokens,
                         cache_read_input_tokens=out.cached_tokens)  # fmt: skip
    stop_reason = _stop_reason(out.finish_reason)
    return MessageResponse(id=message_id, model=body.model, content=content, stop_reason=stop_reason,
                           usage=usage).model_dump()  # fmt: skip


@blueprint.post("/v1/messages/count_tokens")
@document_request(CountTokensRequest)
@document_response(TokenCount, 200)
@_documented_errors
async def count_tokens() -> dict[str, Any]:
    """The tokens a Messages request's prompt (system, messages and tools, through the chat template) takes."""
    body = await read_body(CountTokensRequest)
    server_state().require_model(body.model)
    prompt, _ = await render_chat(_chat_request(body))
    return TokenCount(input_tokens=len(prompt.token_ids)).model_dump()


def _chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The same request as chat completions reads it."""
    messages: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(block.text for block in body.system)
        messages.append({"role": "system", "content": system})
    for message in body.messages:
        messages += _chat_messages(message)
    fields: dict[str, Any] = {"model": body.model, "messages": messages, **_tool_fields(body)}
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
                      top_p=body.top_p, top_k=body.top_k)  # fmt: skip
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as error:
        raise validation_error(error) from None


def _chat_messages(message: Message) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become `tool` messages, in order."""
    out: list[dict[str, Any]] = []
    turn: dict[str, Any] = {"role": message.role, "content": ""}
    for block in message.blocks():
        if isinstance(block, TextBlock):
            turn["content"] += block.text
        elif isinstance(block, ThinkingBlock):
            turn["reasoning_content"] = block.thinking
        elif isinstance(block, ToolUseBlock):
            turn.setdefault("tool_calls", []).append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})  # fmt: skip
        else:
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
    if turn["content"] or "tool_calls" in turn or not out:
        out.append(turn)
    return out


def _tool_fields(body: CountTokensRequest) -> dict[str, Any]:
    choice = body.tool_choice
    if not body.tools:
        return {}
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema}} for t in body.tools]  # fmt: skip
    fields: dict[str, Any] = {"tools": tools}
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice.name")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    return fields


def _tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is; text that is not a JSON object stays readable."""
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        return {"arguments": call.arguments}
    return arguments if isinstance(arguments, dict) else {"arguments": arguments}


def _stop_reason(finish_reason: str | None) -> StopReason | None:
    return {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}.get(finish_reason or "", "end_turn")


def _error_event(error: APIError) -> dict[str, Any]:
    """A failure after the stream began, as Anthropic's `error` event (which its SDK raises)."""
    return error.anthropic_body()


async def _events(
    client: AsyncEngineClient, run: ChatRun, message_id: str, model: str
) -> AsyncGenerator[dict[str, Any], None]:
    usage = {"input_tokens": run.prompt_tokens, "output_tokens": 0}
    yield {"type": "message_start", "message": {"id": message_id, "type": "message", "role": "assistant",
                                                "model": model, "content": [], "stop_reason": None,
                                                "stop_sequence": None, "usage": usage}}  # fmt: skip
    index = -1  # of the open content block
    open_key: tuple[str, int] | None = None
    async with aclosing(run_streamed(client, run)) as pieces:
        async for piece in pieces:
            event = piece.event
            if event is None:
                if open_key is not None:
                    yield {"type": "content_block_stop", "index": index}
                elif index < 0:  # nothing was said: an empty text block
                    yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
                    yield {"type": "content_block_stop", "index": 0}
                yield {"type": "message_delta", "delta": {"stop_reason": _stop_reason(piece.finish_reason),
                                                          "stop_sequence": None},
                       "usage": {"output_tokens": piece.completion_tokens}}  # fmt: skip
                yield {"type": "message_stop"}
                continue
            key = ("call", event.index) if event.kind in ("call", "arguments") else (event.kind, 0)
            if key != open_key:
                if open_key is not None:
                    yield {"type": "content_block_stop", "index": index}
                index += 1
                open_key = key
                block = _block_start(event.kind, event.text)
                yield {"type": "content_block_start", "index": index, "content_block": block}
            if event.kind != "call":  # a call's name came with its block
                yield {"type": "content_block_delta", "index": index, "delta": _delta(event.kind, event.text)}


_DELTAS = {"content": ("text_delta", "text"), "reasoning": ("thinking_delta", "thinking"),
           "arguments": ("input_json_delta", "partial_json")}  # fmt: skip


def _delta(kind: str, text: str) -> dict[str, str]:
    delta_type, field = _DELTAS[kind]
    return {"type": delta_type, field: text}


def _block_start(kind: str, text: str) -> dict[str, Any]:
    if kind == "call":
        return {"type": "tool_use", "id": _tool_use_id(), "name": text, "input": {}}
    if kind == "reasoning":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}
