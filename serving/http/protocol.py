"""The OpenAI wire format: request and response bodies as pydantic models.

Requests are validated strictly, with one leniency LMDeploy's clients rely on (its server's pydantic
is lax): a boolean or number field also takes its JSON spelled as a string (`"stream": "true"`,
`"max_tokens": "16"`, `"temperature": "0.5"`), nothing looser (`"yes"`, `2.5` for an integer and
`true` for a number stay a 400). Unknown fields are ignored, because clients such as LangChain and the
openai SDK send fields this server has no use for (`user`, `parallel_tool_calls`, ...). Optional fields
also accept `null`, which several clients send instead of leaving a field out. The same models are the
OpenAPI schemas.

Fields that change what a request means but are not implemented yet (`logit_bias`, the penalties, ...)
are declared, so that any value other than the ones that
change nothing is a 400 naming the field: a client that bans tokens or asks for JSON is told, not
silently served something else (`UNSUPPORTED_FIELDS`).

Fields that are a union of JSON shapes (`prompt`, `stop`, message `content`) pick their branch by the
value's JSON type, so an error names only the shape the client meant; `UNION_TAGS` lists the branch
names pydantic puts in an error's location, which the error formatter leaves out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import core_schema

from serving.request import MAX_SEED

MAX_N = 128  # OpenAI's own bound on `n`; each choice is one engine request
MAX_STOP_STRINGS = 16  # OpenAI allows 4; stop-string matching costs per emitted character, so bound it
MAX_STOP_LENGTH = 256
# Chat templates run in Python per message: bound the count so a body of tiny messages cannot buy
# seconds of CPU before its length is even checked.
MAX_MESSAGES = 4096

UNION_TAGS = frozenset({"string", "strings", "tokens", "token_lists", "parts", "named", "items"})


def _json_shape(value: Any) -> str:
    """The branch of a str / list[str] / list[int] / list[list[int]] union a JSON value belongs to."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and value:
        if isinstance(value[0], int) and not isinstance(value[0], bool):
            return "tokens"
        if isinstance(value[0], list):
            return "token_lists"
    return "strings"


# A boolean or number spelled as a JSON string (LMDeploy's lax pydantic reads these), as regular expressions
# that both the validation and the OpenAPI document use.
_SPELLINGS = {
    bool: r"\s*([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])\s*",
    int: r"\s*[+-]?[0-9]+\s*",
    float: r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*",
}
MAX_SPELLED_LENGTH = 64  # past it no value is in range; int() of thousands of digits is slow and refuses


@dataclass(frozen=True)
class _AlsoSpelled:
    """Lets a bool, int or float field also take its value spelled as a string, and documents that."""

    kind: type

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str) and len(value) <= MAX_SPELLED_LENGTH and re.fullmatch(_SPELLINGS[self.kind], value):
            text = value.strip()
            return text.lower() == "true" if self.kind is bool else self.kind(text)
        return value  # for strict validation to accept or refuse

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(self.coerce, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        spelled = {"type": "string", "pattern": f"^{_SPELLINGS[self.kind]}$", "maxLength": MAX_SPELLED_LENGTH}
        return {"anyOf": [handler(schema), spelled]}


def lax(kind: type, **constraints: Any) -> Any:
    """`kind` with `Field` constraints (checked after the string is read), also taking its string spelling."""
    return Annotated[kind, Field(**constraints), _AlsoSpelled(kind)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _is(harmless: object) -> Callable[[Any], bool]:
    return lambda value: value == harmless and type(value) is type(harmless)


def _is_zero(value: Any) -> bool:
    return type(value) in (int, float) and value == 0


# Not implemented yet, each with the values that change nothing (besides null) and what to do instead.
_SAMPLING_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (_is({}), "leave it out"),
    "presence_penalty": (_is_zero, "leave it out or send 0; repetition_penalty is supported"),
    "frequency_penalty": (_is_zero, "leave it out or send 0; repetition_penalty is supported"),
    "min_tokens": (_is_zero, "min_new_tokens is supported"),
    "bad_words": (_is([]), "leave it out"),
    "allowed_token_ids": (_is([]), "leave it out"),
    "prompt_logprobs": (_is(None), "logprobs are not supported"),
    "use_beam_search": (_is(False), "only sampling is supported"),
    "truncate_prompt_tokens": (_is(None), "send the prompt you want read"),
}
_CHAT_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_is([]), "use tools"),
    "function_call": (_is(None), "use tools and tool_choice"),
    "audio": (_is(None), "this server reads and writes text only"),
    "modalities": (_is(["text"]), "this server writes text only"),
    "web_search_options": (_is(None), "this server does not search the web"),
}
UNSUPPORTED_FIELDS = {**_SAMPLING_UNSUPPORTED, **_CHAT_UNSUPPORTED}


def _unsupported() -> Any:
    return Field(None, description="Not supported yet: only null or a value that changes nothing (else a 400).")


def _refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    harmless, instead = UNSUPPORTED_FIELDS[info.field_name]
    if value is not None and not harmless(value):
        raise ValueError(f"this server does not support {info.field_name} yet ({instead})")
    return value


class StreamOptions(_Request):
    include_usage: lax(bool) | None = Field(None, description="Send a last chunk with `usage` and no choices.")


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
Stop = Annotated[
    Annotated[StopString, Tag("string")]
    | Annotated[list[StopString], Tag("strings"), Field(max_length=MAX_STOP_STRINGS)],
    Discriminator(lambda v: "string" if isinstance(v, str) else "strings"),
]


class SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str = Field(description="The served model name, as listed by GET /v1/models.")
    max_tokens: lax(int, ge=1) | None = Field(
        None, description="Most tokens to generate; null means up to the session length."
    )
    max_completion_tokens: lax(int, ge=1) | None = Field(None, description="Same as `max_tokens` (newer name).")
    temperature: lax(float, ge=0, le=2) | None = Field(
        None, description="0 is greedy; null takes the model's generation_config default, else 1."
    )
    top_p: lax(float, gt=0, le=1) | None = None
    top_k: lax(int, ge=-1) | None = Field(None, description="0 or -1 switch top-k off.")
    min_p: lax(float, ge=0, le=1) | None = None
    repetition_penalty: lax(float, gt=0, le=10) | None = None
    n: lax(int, ge=1, le=MAX_N) | None = Field(None, description="Choices to generate for each prompt.")
    stop: Stop | None = Field(None, description="Strings that end the generation (not included in the text).")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the generation.")
    seed: lax(int, ge=0, le=MAX_SEED) | None = Field(None, description="Choice i samples with seed + i.")
    stream: lax(bool) | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: lax(bool) | None = False
    min_new_tokens: lax(int, ge=0) | None = Field(None, description="Tokens to generate before EOS may end.")
    skip_special_tokens: lax(bool) | None = True
    spaces_between_special_tokens: lax(bool) | None = True
    include_stop_str_in_output: lax(bool) | None = False
    user: str | None = Field(None, description="Accepted and ignored.")
    logit_bias: Any = _unsupported()
    presence_penalty: Any = _unsupported()
    frequency_penalty: Any = _unsupported()
    response_format: dict[str, Any] | None = Field(
        None, description="`{type: json_object}`, `{type: json_schema, json_schema: {name, schema, strict}}` or "
        "LMDeploy's `{type: regex_schema, regex_schema: PATTERN}`: the answer is constrained to it (a schema "
        "keyword that cannot be enforced is a 400 naming it).")
    min_tokens: Any = _unsupported()
    bad_words: Any = _unsupported()
    allowed_token_ids: Any = _unsupported()
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: a JSON schema the answer follows.")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression the answer matches.")
    guided_choice: list[str] | None = Field(None, description="vLLM's: the answer is one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM's: a Lark or GBNF grammar the answer follows.")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's newer spelling: `{json | regex | choice | grammar: ...}` or `{json_object: true}`.")
    guided_decoding_backend: str | None = Field(
        None, description="`device` or `host`: where a regular constraint runs (default: the device when regular).")
    prompt_logprobs: Any = _unsupported()
    use_beam_search: Any = _unsupported()
    truncate_prompt_tokens: Any = _unsupported()

    _refuse_unsupported = field_validator(*_SAMPLING_UNSUPPORTED)(_refuse_unsupported)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Request):
    type: str = Field(description="Only `text` is supported.")
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported; this server reads text only")
        return value


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text (an object is accepted too).")


class MessageToolCall(_Request):
    """A call an earlier assistant turn made, as the client sends it back in `messages`."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        Annotated[
            Annotated[str, Tag("string")] | Annotated[list[TextPart], Tag("parts")],
            Discriminator(lambda v: "string" if isinstance(v, str) else "parts"),
        ]
        | None
    ) = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    reasoning_content: str | None = Field(None, description="An earlier turn's reasoning, for templates that use it.")

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON Schema.")
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("string")] | Annotated[NamedToolChoice, Tag("named")],
    Discriminator(lambda v: "string" if isinstance(v, str) else "named"),
]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template, e.g. `enable_thinking`."
    )
    tools: list[ToolDefinition] | None = Field(
        None, description="Functions the model may call (needs the server's --tool-call-parser)."
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description="`auto` (the default with tools), `none`, `required`, or `{type: function, function: {name}}`. "
        "`required` and a named function are enforced: the call's start is written into the prompt and the rest "
        "is constrained to a tool's name and parameters' schema.",
    )
    parallel_tool_calls: bool | None = Field(None, description="false keeps only the first call.")
    logprobs: bool | None = Field(None, description="Not supported: only false or null.")
    top_logprobs: int | None = Field(None, description="Not supported: only 0 or null.")
    functions: Any = _unsupported()
    function_call: Any = _unsupported()
    audio: Any = _unsupported()
    modalities: Any = _unsupported()
    web_search_options: Any = _unsupported()

    _refuse_unsupported_chat = field_validator(*_CHAT_UNSUPPORTED)(_refuse_unsupported)


PromptField = Annotated[
    Annotated[str, Tag("string")]
    | Annotated[list[str], Tag("strings"), Field(min_length=1, max_length=MAX_N)]
    | Annotated[list[Annotated[int, Field(ge=0)]], Tag("tokens")]
    | Annotated[
        list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
        Tag("token_lists"),
        Field(max_length=MAX_N),  # each prompt is at least one choice
    ],
    Discriminator(_json_shape),
]


class CompletionRequest(SamplingFields):
    prompt: PromptField = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists; "
        "each prompt gets `n` choices."
    )
    echo: bool | None = Field(None, description="Not supported: only false or null.")
    suffix: str | None = Field(None, description="Not supported: only null or empty.")
    logprobs: int | None = Field(None, description="Not supported: only 0 or null.")
    best_of: int | None = Field(None, description="Only null or equal to `n`.")


# ---- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens taken from the prefix cache instead of computed.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text as the model wrote it.")


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="With --reasoning-parser: the <think> part.")
    tool_calls: list[ResponseToolCall] | None = None

    # No return annotation: pydantic would document it as the schema instead of the fields.
    @model_serializer(mode="wrap")
    def _leave_out_absent_extras(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None or key == "content"}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: the first carries its id, type and name, the rest arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] = Field(description="`name` (first piece), then `arguments` fragments.")

    @model_serializer(mode="wrap")
    def _leave_out_unchanged(self, handler: SerializerFunctionWrapHandler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatDelta(BaseModel):
    """A streamed piece of a message; fields that did not change are left out, as OpenAI does, except
    `role`, which every delta carries (LMDeploy's clients read it on each chunk; OpenAI's schema allows it)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    # No return annotation: pydantic would document it as the schema instead of ChatDelta's fields.
    @model_serializer(mode="wrap")
    def _leave_out_unchanged(self, handler: SerializerFunctionWrapHandler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="Present (null until the last chunk) with include_usage.")
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = Field(description="null in stream chunks until the choice ends.")


class CompletionResponse(BaseModel):
    """Both the whole answer and each stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "xlserve"
    root: str | None = Field(None, description="The checkpoint directory (null for the demo model).")
    max_model_len: int | None = Field(None, description="The session length: prompt plus completion.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model: str


class ProfileStatus(BaseModel):
    status: Literal["started", "stopped"]
    dir: str  # --profile-dir, absolute; each trace lands in plugins/profile/<time>/ under it
