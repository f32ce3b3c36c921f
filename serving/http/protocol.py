"""The OpenAI wire format: request and response bodies as pydantic models.

Requests are validated strictly, with one leniency LMDeploy's clients rely on (its server's pydantic
is lax): a boolean or number field also takes its JSON spelled as a string (`"stream": "true"`,
`"max_tokens": "16"`, `"temperature": "0.5"`), nothing looser (`"yes"`, `2.5` for an integer and
`true` for a number stay a 400). Unknown fields are ignored, because clients such as LangChain and the
openai SDK send fields this server has no use for (`user`, `parallel_tool_calls`, ...). Optional fields
also accept `null`, which several clients send instead of leaving a field out. The same models are the
OpenAPI schemas.

Fields that change what a request means but are not implemented yet (`allowed_token_ids`,
`prompt_logprobs`, ...) are declared, so that any value other than the ones that change nothing is a 400
naming the field: a client is told, not silently served something else (`UNSUPPORTED_FIELDS`).
Numeric sampling fields take their bounds from the engine's one declaration of each option
(`option_type`, from `GenerationConfig`), narrowed where OpenAI's API is narrower.

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

from serving.request import MAX_LOGIT_BIAS, MAX_SEED, GenerationConfig
from serving.sampling_options import declared_options

MAX_N = 128  # OpenAI's own bound on `n`; each choice is one engine request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the legacy completions' `logprobs`
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


_OPTIONS = {declared.name: declared for declared in declared_options(GenerationConfig)}


def option_type(name: str, high: float | None = None) -> Any:
    """The type of an HTTP field for the declared option `name` (`GenerationConfig`): its kind and range,
    with OpenAI's narrower upper bound where the declaration has one (or `high`)."""
    declared = _OPTIONS[name]
    spec = declared.spec
    upper = high if high is not None else spec.api_high if spec.api_high is not None else spec.high
    bounds = {"gt" if spec.low_open else "ge": spec.low, "lt" if spec.high_open else "le": upper}
    return lax(declared.kind, **{key: declared.kind(value) for key, value in bounds.items()})


def _logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    for key in value:
        if not re.fullmatch(r"[0-9]+", key):
            raise ValueError(f"keys must be token ids written as strings (e.g. \"50256\"), got {key!r}")
    return value


LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)]


# Not implemented yet, each with the values that change nothing (besides null) and what to do instead.
_SAMPLING_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "allowed_token_ids": (_is([]), "leave it out"),
    "prompt_logprobs": (_is(None), "use echo with logprobs on /v1/completions"),
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
    temperature: option_type("temperature") | None = Field(
        None, description="0 is greedy; null takes the model's generation_config default, else 1."
    )
    top_p: option_type("top_p") | None = None
    top_k: lax(int, ge=-1) | None = Field(None, description="0 or -1 switch top-k off.")
    min_p: option_type("min_p") | None = None
    repetition_penalty: option_type("repetition_penalty") | None = None
    presence_penalty: option_type("presence_penalty") | None = Field(
        None, description="Subtracted from the logit of every token generated so far (OpenAI's)."
    )
    frequency_penalty: option_type("frequency_penalty") | None = Field(
        None, description="Times how often a token was generated so far, subtracted from its logit (OpenAI's)."
    )
    logit_bias: LogitBias | None = Field(
        None, description=f"Token id (as a string) -> a value in [-100, 100] added to its logit; "
        f"at most {MAX_LOGIT_BIAS} entries."
    )
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Words never generated; each must be one token "
        "(with or without a leading space)."
    )
    n: lax(int, ge=1, le=MAX_N) | None = Field(None, description="Choices to generate for each prompt.")
    stop: Stop | None = Field(None, description="Strings that end the generation (not included in the text).")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the generation.")
    seed: lax(int, ge=0, le=MAX_SEED) | None = Field(None, description="Choice i samples with seed + i.")
    stream: lax(bool) | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: lax(bool) | None = False
    min_new_tokens: option_type("min_new_tokens") | None = Field(
        None, description="Tokens to generate before EOS may end."
    )
    min_tokens: option_type("min_new_tokens") | None = Field(None, description="Same as `min_new_tokens` (vLLM's).")
    skip_special_tokens: lax(bool) | None = True
    spaces_between_special_tokens: lax(bool) | None = True
    include_stop_str_in_output: lax(bool) | None = False
    user: str | None = Field(None, description="Accepted and ignored.")
    response_format: dict[str, Any] | None = Field(
        None, description="`{type: json_object}`, `{type: json_schema, json_schema: {name, schema, strict}}` or "
        "LMDeploy's `{type: regex_schema, regex_schema: PATTERN}`: the answer is constrained to it (a schema "
        "keyword that cannot be enforced is a 400 naming it).")
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
    _check_logit_bias = field_validator("logit_bias")(_logit_bias)

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
    logprobs: lax(bool) | None = Field(None, description="Return each generated token's log probability.")
    top_logprobs: option_type("logprobs") | None = Field(
        None, description="With logprobs: also this many most likely tokens at each position."
    )
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
    max_tokens: lax(int, ge=0) | None = Field(
        None, description="Most tokens to generate; null means up to the session length; 0 only with `echo`."
    )
    echo: lax(bool) | None = Field(None, description="Return the prompt before the completion (with its log "
                                   "probabilities when `logprobs` is set; the first token's is null).")
    suffix: str | None = Field(None, description="Not supported: only null or empty.")
    logprobs: option_type("logprobs", high=MAX_COMPLETION_LOGPROBS) | None = Field(
        None, description="Return each token's log probability and this many most likely tokens'."
    )
    best_of: lax(int, ge=1, le=MAX_N) | None = Field(
        None, description="Generate this many choices per prompt and return the `n` of the highest cumulative "
        "log probability (not with `stream`)."
    )


class EmbeddingRequest(_Request):
    model: str = Field(description="The served model name, as listed by GET /v1/models.")
    input: PromptField = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists: one embedding "
        "each, in order."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (the default): lists of numbers; base64: each vector's little-endian float32 "
        "bytes, base64-encoded (what the openai SDK asks for and decodes)."
    )
    dimensions: lax(int, ge=1) | None = Field(
        None, description="Keep the vector's first this many numbers, normalized again (Matryoshka-trained "
        "models); at most the model's hidden size."
    )
    user: str | None = Field(None, description="Ignored.")


# ---- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens taken from the prefix cache instead of computed.")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="Completion tokens of the reasoning (with --reasoning-parser).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
           reasoning_tokens: int | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            completion_tokens_details=None if reasoning_tokens is None else CompletionTokensDetails(
                reasoning_tokens=reasoning_tokens),
        )

    # No return annotation: pydantic would document it as the schema instead of the fields.
    @model_serializer(mode="wrap")
    def _leave_out_absent_details(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if data.get("completion_tokens_details") is None:
            data.pop("completion_tokens_details", None)
        return data


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely tokens at this position (top_logprobs).")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions' log probabilities: four lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for an echoed prompt's first token.")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token's text starts in `text`.")


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
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
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


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="The vector, or its base64 float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


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
