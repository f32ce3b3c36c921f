"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat path (`chat_run`).

`input` (a text, or message, `function_call` and `function_call_output` items) and `instructions` become
chat messages; `tools` (function tools), `tool_choice`, `parallel_tool_calls`, `max_output_tokens`,
`temperature` and `top_p` become the chat request's. The answer's `output` holds a `reasoning` item (with
the server's --reasoning-parser), a `message` item with `output_text`, and one `function_call` item per
call; a length cut makes it `incomplete` (`max_output_tokens`). With `stream: true` the answer is the
Responses event stream (`response.created` ... `response.completed`, each SSE event named by its type).
Nothing is stored: `previous_response_id` and `background` are refused, `store` is accepted and has no effect.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body, validation_error
from serving.http.chat_run import ChatRun, ChoiceOutput, run_streamed, run_whole, start_chat
from serving.http.engine_client import AsyncEngineClient
from serving.http.errors import APIError
from serving.http.openapi import document_errors, streams
from serving.http.protocol import MAX_MESSAGES, ChatCompletionRequest, lax
from serving.http.sse import typed_sse_response
from serving.http.state import server_state

blueprint = Blueprint("responses", __name__)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # as protocol's requests


class InputText(_Request):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[InputText], Tag("parts")],
        Discriminator(lambda v: "string" if isinstance(v, str) else "parts"),
    ]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    # An item without a type is a message, as OpenAI reads `{"role": ..., "content": ...}`.
    Discriminator(lambda v: (v.get("type") or "message") if isinstance(v, dict) else getattr(v, "type", "message")),
]


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Request):
    model: str
    input: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[InputItem], Tag("items"), Field(min_length=1,
                                                                                        max_length=MAX_MESSAGES)],
        Discriminator(lambda v: "string" if isinstance(v, str) else "items"),
    ] = Field(description="A user message, or a list of message, function_call and function_call_output items.")
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: lax(int, ge=1) | None = Field(None, description="Most tokens to generate.")
    temperature: lax(float, ge=0, le=2) | None = None
    top_p: lax(float, gt=0, le=1) | None = None
    stream: lax(bool) | None = False
    tools: list[FunctionTool] | None = Field(None, description="Function tools (needs --tool-call-parser).")
    tool_choice: (
        Annotated[
            Annotated[Literal["none", "auto", "required"], Tag("string")]
            | Annotated[NamedFunctionChoice, Tag("named")],
            Discriminator(lambda v: "string" if isinstance(v, str) else "named"),
        ]
        | None
    ) = None
    parallel_tool_calls: lax(bool) | None = None
    previous_response_id: str | None = Field(None, description="Not supported: this server stores nothing.")
    background: lax(bool) | None = Field(None, description="Not supported: only false or null.")
    store: lax(bool) | None = Field(None, description="Accepted; nothing is ever stored.")
    text: dict[str, Any] | None = Field(
        None, description="`{format: {type: text | json_object | json_schema (name, schema, strict)}}`.")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = []
    content: list[ReasoningText]


class FunctionCallOutput(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[ReasoningItem | OutputMessage | FunctionCallOutput]
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    store: bool = False
    text: dict[str, Any] = {"format": {"type": "text"}}
    metadata: dict[str, Any] = {}
    usage: ResponseUsage | None = None


class ResponseStreamEvent(BaseModel):
    """One event of a streamed response; the fields besides these depend on `type` (OpenAI's event types)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


@blueprint.post("/v1/responses")
@document_request(ResponsesRequest)
@document_response(ResponseObject, 200)
@document_errors(400, 404, 408, 413, 422, 500, 503)
@streams(ResponseStreamEvent)
async def responses() -> Response | dict[str, Any]:
    """Create a model response (OpenAI's Responses API; stateless)."""
    body = await read_body(ResponsesRequest)
    state = server_state()
    state.require_model(body.model)
    _refuse_unsupported(body)
    response_id = f"resp_{uuid.uuid4().hex}"
    run = await start_chat(_chat_request(body), response_id)
    shell = ResponseObject(
        id=response_id, created_at=int(time.time()), status="in_progress", model=body.model, output=[],
        instructions=body.instructions, max_output_tokens=body.max_output_tokens, temperature=body.temperature,
        top_p=body.top_p, tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []],
        tool_choice=body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
        or "auto", parallel_tool_calls=body.parallel_tool_calls is not False,
    )  # fmt: skip
    if body.stream:
        return typed_sse_response(_events(state.engine_client, run, shell), _error_event)
    [out] = await run_whole(state.engine_client, run)
    tokens = (run.prompt_tokens, out.cached_tokens, out.completion_tokens)
    return _finished(shell, _output_items(out), out.finish_reason, tokens).model_dump()


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                       "conversation as `input` items", param="previous_response_id")  # fmt: skip
    if body.background:
        raise APIError(400, "background responses are not supported", param="background")
    text_format = (body.text or {}).get("format") or {"type": "text"}
    if text_format.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "text.format.type must be text, json_object or json_schema", param="text.format")


def _response_format(text_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Responses API's `text.format` (its json_schema fields sit flat) as chat's `response_format`."""
    if not text_format or text_format.get("type") != "json_schema":
        return text_format
    return {"type": "json_schema", "json_schema": {k: v for k, v in text_format.items() if k != "type"}}


def _chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The same request as chat completions reads it."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls of one turn go in one message
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    choice = body.tool_choice
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
        "tools": [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                  for tool in body.tools] if body.tools else None,
        "tool_choice": {"type": "function", "function": {"name": choice.name}}
        if isinstance(choice, NamedFunctionChoice) else choice,
        "response_format": _response_format((body.text or {}).get("format")),
    }  # fmt: skip
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as error:
        raise validation_error(error) from None


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _output_items(out: ChoiceOutput) -> list[ReasoningItem | OutputMessage | FunctionCallOutput]:
    items: list[ReasoningItem | OutputMessage | FunctionCallOutput] = []
    if out.reasoning:
        items.append(ReasoningItem(id=_item_id("rs"), content=[ReasoningText(text=out.reasoning)]))
    if out.content or not out.calls:
        items.append(OutputMessage(id=_item_id("msg"), content=[OutputText(text=out.content or "")]))
    for call in out.calls:
        items.append(FunctionCallOutput(id=_item_id("fc"), call_id=_item_id("call"), name=call.name,
                                        arguments=call.arguments))  # fmt: skip
    return items


def _finished(
    shell: ResponseObject,
    items: list[ReasoningItem | OutputMessage | FunctionCallOutput],
    finish_reason: str | None,
    tokens: tuple[int, int, int],
) -> ResponseObject:
    """The answer once done; `tokens`: prompt, cached and completion tokens."""
    prompt_tokens, cached_tokens, completion_tokens = tokens
    incomplete = finish_reason == "length"
    usage = ResponseUsage(
        input_tokens=prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
        output_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    return shell.model_copy(update={
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
        "output": items,
        "usage": usage,
    })  # fmt: skip


def _error_event(error: APIError) -> dict[str, Any]:
    """A failure after the stream began, as the Responses API's `error` event."""
    return {"type": "error", "code": error.code, "message": error.message, "param": error.param,
            "sequence_number": 0}  # fmt: skip


class _Stream:
    """The Responses event sequence of one answer, built from the chat path's pieces: an output item is
    opened when a piece of another kind (or another call) begins, and closed with its `done` events."""

    def __init__(self, shell: ResponseObject):
        self.shell = shell
        self.sequence = 0
        self.items: list[ReasoningItem | OutputMessage | FunctionCallOutput] = []
        self.open_key: tuple[str, int] | None = None  # (kind, call index) of the open item
        self.open_id = ""
        self.text = ""
        self.call_name = ""
        self.call_id = ""

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": type, "sequence_number": self.sequence - 1, **fields}

    def piece(self, kind: str, text: str, index: int) -> list[dict[str, Any]]:
        key = ("call", index) if kind in ("call", "arguments") else (kind, 0)
        events = [] if key == self.open_key else self.close() + self.open(key, text if kind == "call" else "")
        if kind == "call":
            return events
        self.text += text
        output_index = len(self.items)
        if kind == "arguments":
            return events + [self.event("response.function_call_arguments.delta", item_id=self.open_id,
                                        output_index=output_index, delta=text)]  # fmt: skip
        name = "response.output_text.delta" if kind == "content" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "content" else {}
        return events + [self.event(name, item_id=self.open_id, output_index=output_index, content_index=0,
                                    delta=text, **extra)]  # fmt: skip

    def open(self, key: tuple[str, int], name: str) -> list[dict[str, Any]]:
        self.open_key, self.text, self.call_name = key, "", name
        output_index = len(self.items)
        if key[0] == "call":
            self.open_id, self.call_id = _item_id("fc"), _item_id("call")
            item = FunctionCallOutput(id=self.open_id, call_id=self.call_id, name=name, arguments="",
                                      status="in_progress")  # fmt: skip
            return [self.event("response.output_item.added", output_index=output_index, item=item.model_dump())]
        if key[0] == "reasoning":
            self.open_id = _item_id("rs")
            item = ReasoningItem(id=self.open_id, content=[])
            return [self.event("response.output_item.added", output_index=output_index, item=item.model_dump())]
        self.open_id = _item_id("msg")
        message = OutputMessage(id=self.open_id, status="in_progress", content=[])
        return [
            self.event("response.output_item.added", output_index=output_index, item=message.model_dump()),
            self.event("response.content_part.added", item_id=self.open_id, output_index=output_index,
                       content_index=0, part=OutputText(text="").model_dump()),
        ]  # fmt: skip

    def close(self) -> list[dict[str, Any]]:
        if self.open_key is None:
            return []
        kind, output_index, text = self.open_key[0], len(self.items), self.text
        self.open_key = None
        if kind == "call":
            item: Any = FunctionCallOutput(id=self.open_id, call_id=self.call_id, name=self.call_name,
                                           arguments=text)  # fmt: skip
            events = [self.event("response.function_call_arguments.done", item_id=self.open_id,
                                 output_index=output_index, name=self.call_name, arguments=text)]  # fmt: skip
        elif kind == "reasoning":
            item = ReasoningItem(id=self.open_id, content=[ReasoningText(text=text)])
            events = [self.event("response.reasoning_text.done", item_id=self.open_id, output_index=output_index,
                                 content_index=0, text=text)]  # fmt: skip
        else:
            item = OutputMessage(id=self.open_id, content=[OutputText(text=text)])
            events = [
                self.event("response.output_text.done", item_id=self.open_id, output_index=output_index,
                           content_index=0, text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=self.open_id, output_index=output_index,
                           content_index=0, part=OutputText(text=text).model_dump()),
            ]  # fmt: skip
        self.items.append(item)
        return events + [self.event("response.output_item.done", output_index=output_index, item=item.model_dump())]


async def _events(
    client: AsyncEngineClient, run: ChatRun, shell: ResponseObject
) -> AsyncGenerator[dict[str, Any], None]:
    stream = _Stream(shell)
    yield stream.event("response.created", response=shell.model_dump())
    yield stream.event("response.in_progress", response=shell.model_dump())
    async with aclosing(run_streamed(client, run)) as pieces:
        async for piece in pieces:
            if piece.event is not None:
                for event in stream.piece(piece.event.kind, piece.event.text, piece.event.index):
                    yield event
                continue
            if not stream.items and stream.open_key is None:  # nothing was said: an empty message
                for event in stream.open(("content", 0), ""):
                    yield event
            for event in stream.close():
                yield event
            tokens = (run.prompt_tokens, piece.cached_tokens, piece.completion_tokens)
            final = _finished(shell, stream.items, piece.finish_reason, tokens)
            kind = "response.incomplete" if final.status == "incomplete" else "response.completed"
            yield stream.event(kind, response=final.model_dump())
