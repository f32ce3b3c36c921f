"""POST /v1/chat/interactive: LMDeploy's stateful chat, where the server keeps each session's history.

A client sends only its new turn with `interactive_mode: true` and the same `session_id` every
time; the server prepends the session's history (`serving.http.sessions`) and the engine prefills
only what its pinned pages do not already hold. `interactive_mode: false` (the default) runs the turn
on top of any history and then ends the session, so a client that sends the whole conversation each
time gets a stateless chat. `session_id: -1` is a one-off request, never kept.

Control forms, answered at once: `interactive_mode: false` with `prompt: ""` and
`request_output_len: 0` ends a session (its pages are unpinned); `cancel: true` aborts the session's
running turn, which then ends with `finish_reason: "abort"` and leaves the history as it was before.

The answer is `{text, tokens, input_tokens, history_tokens, finish_reason}`: `tokens` generated,
`input_tokens` this turn added, `history_tokens` the session held before it. A stream is NDJSON
(`<json>\\n` per line, each with the new text, the last with the finish reason), as LMDeploy sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from quart import Blueprint, Response
from quart_schema import document_request, document_response

from serving.http.body import read_body
from serving.http.choices import fan_out, generate
from serving.http.engine_client import AsyncEngineClient
from serving.http.errors import APIError
from serving.http.openapi import document_errors, ndjson_stream
from serving.http.prompts import messages_chars
from serving.http.protocol import MAX_MESSAGES, ChatMessage, Stop, lax
from serving.http.sessions import Session, Turn, turn_tokens
from serving.http.sse import ndjson_response
from serving.http.state import ServerState, server_state
from serving.request import MAX_INT32, MAX_SEED, EngineRequest, GenerationConfig
from serving.text.tokenizer import PromptTooLong

blueprint = Blueprint("interactive", __name__)

ONE_OFF_SESSION = -1  # LMDeploy's "no session": an id of its own, never kept
# A cancel answers once the turn has ended, so the client's next turn never finds the session busy.
CANCEL_WAIT_S = 10.0


class InteractiveRequest(BaseModel):
    # As the OpenAI routes: strict types (booleans and numbers also spelled as strings, `protocol.lax`),
    # unknown fields ignored, null accepted for every option.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    # The branch tags are ones error paths leave out (protocol.UNION_TAGS): `prompt[0].role`, not `prompt.parts[0]...`
    prompt: Annotated[
        Annotated[str, Tag("string")]
        | Annotated[list[ChatMessage], Tag("parts"), Field(min_length=1, max_length=MAX_MESSAGES)],
        Discriminator(lambda v: "string" if isinstance(v, str) else "parts"),
    ] = Field(description="A user message, or a list of chat messages (the new turns, or a whole conversation).")
    session_id: lax(int, ge=-1, le=MAX_SEED) | None = Field(
        ONE_OFF_SESSION, description="The session's id; -1 is a one-off request, never kept."
    )
    interactive_mode: lax(bool) | None = Field(
        False, description="true: keep the history for the next turn; false: end the session after this turn."
    )
    stream: lax(bool) | None = Field(False, description="Answer as NDJSON lines, one per piece of text.")
    stop: Stop | None = Field(None, description="Strings that end the answer (not included in the text).")
    request_output_len: lax(int, ge=0, le=MAX_INT32) | None = Field(
        None, description="Most tokens to generate; null means up to the session length."
    )
    top_p: lax(float, gt=0, le=1) | None = 0.8
    top_k: lax(int, ge=0, le=MAX_INT32) | None = Field(40, description="0 switches top-k off.")
    temperature: lax(float, ge=0, le=2) | None = Field(0.8, description="0 is greedy.")
    repetition_penalty: lax(float, gt=0, le=10) | None = 1.0
    min_p: lax(float, ge=0, le=1) | None = 0.0
    min_new_tokens: lax(int, ge=0, le=MAX_INT32) | None = None
    seed: lax(int, ge=0, le=MAX_SEED) | None = None
    ignore_eos: lax(bool) | None = False
    skip_special_tokens: lax(bool) | None = True
    spaces_between_special_tokens: lax(bool) | None = True
    cancel: lax(bool) | None = Field(False, description="Abort the session's running turn.")
    adapter_name: str | None = Field(None, description="Not supported (no LoRA adapters): only null.")
    image_url: str | list[str] | None = Field(None, description="Not supported (text only): only null.")

    def option(self, name: str) -> Any:
        """A field's value, or its documented default where the client sent null."""
        value = getattr(self, name)
        return type(self).model_fields[name].default if value is None else value


class InteractiveResponse(BaseModel):
    """The answer, and each NDJSON line of a stream (`text` is then the new piece)."""

    text: str
    tokens: int = Field(description="Tokens generated so far in this turn.")
    input_tokens: int = Field(description="Tokens this turn added to the session.")
    history_tokens: int = Field(description="Tokens the session held before this turn.")
    finish_reason: Literal["stop", "length", "abort"] | None = Field(
        description="null until the last line of a stream."
    )
    message: str | None = Field(None, description="Why nothing was generated, when the session is full.")


@blueprint.post("/v1/chat/interactive")
@document_request(InteractiveRequest)
@document_response(InteractiveResponse, 200)
@document_errors(400, 408, 413, 500, 503)
@ndjson_stream(InteractiveResponse)
async def chat_interactive() -> Response | dict[str, Any]:
    """Chat with the history kept on the server (LMDeploy's interactive API).

    Send each new turn with `interactive_mode: true` and one `session_id`; end the session with
    `interactive_mode: false, prompt: "", request_output_len: 0`; `cancel: true` aborts its running
    turn. With `stream: true` the answer is `application/x-ndjson`: one InteractiveResponse per line,
    the last with its finish_reason. A second request while a turn runs is a 400 `session_busy`; a
    turn that does not fit the session length answers `finish_reason: "length"` with a `message`.
    """
    body = await read_body(InteractiveRequest)
    _refuse_unsupported(body)
    state = server_state()
    session_id = body.option("session_id")
    stream = body.option("stream")
    if body.option("cancel"):
        return await _answer(_lines(await _cancel(state, session_id)), stream)
    if _ends_session(body):
        history = state.sessions.end(session_id)
        return await _answer(_lines(_line("", 0, 0, history, "stop")), stream)
    state.require_ready()
    return await _answer(await _start_turn(state, body, session_id), stream)


def _refuse_unsupported(body: InteractiveRequest) -> None:
    if body.adapter_name is not None:
        raise APIError(400, "adapter_name: this server serves no LoRA adapters", param="adapter_name")
    if body.image_url is not None:
        raise APIError(400, "image_url: this server reads text only", param="image_url")


def _ends_session(body: InteractiveRequest) -> bool:
    return not body.option("interactive_mode") and body.prompt == "" and body.request_output_len == 0


async def _cancel(state: ServerState, session_id: int) -> dict[str, Any]:
    if session_id == ONE_OFF_SESSION:
        raise APIError(400, "cancel needs the session_id of the turn to cancel, not -1", param="session_id")
    turn = state.sessions.cancel(session_id)
    if turn is not None:
        if turn.request_id is not None:
            state.engine.abort(turn.request_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(turn.ended.wait(), CANCEL_WAIT_S)
    session = state.sessions.get(session_id)
    return _line("", 0, 0, len(session.history) if session is not None else 0, "stop")


def _line(
    text: str,
    tokens: int,
    input_tokens: int,
    history_tokens: int,
    finish_reason: str | None,
    message: str | None = None,
) -> dict[str, Any]:
    line = InteractiveResponse(text=text, tokens=tokens, input_tokens=input_tokens, history_tokens=history_tokens,
                               finish_reason=finish_reason, message=message)  # fmt: skip
    return line.model_dump(exclude={"message"} if message is None else None)


async def _lines(*lines: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    for line in lines:
        yield line


async def _answer(lines: AsyncGenerator[dict[str, Any], None], stream: bool) -> Response | dict[str, Any]:
    """NDJSON lines as they come, or one answer with the whole text."""
    if stream:
        return ndjson_response(lines)
    answer: dict[str, Any] = {}
    text = ""
    async with aclosing(lines):
        async for line in lines:
            text += line["text"]
            answer = line
    return {**answer, "text": text}


@dataclass
class _Plan:
    """What a turn will run: the session's history plus this turn's tokens."""

    prompt_ids: list[int]
    history_tokens: int
    input_tokens: int  # this turn's tokens; a lower bound for a turn too long to tokenize in full
    full: bool  # no room in the session length for a single new token


@dataclass
class _Outcome:
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None: the turn did not finish (cancelled)


async def _start_turn(
    state: ServerState, body: InteractiveRequest, session_id: int
) -> AsyncGenerator[dict[str, Any], None]:
    """Claim the session, plan the turn and return its lines (which free the session when they end)."""
    sessions = state.sessions
    session: Session | None = None
    turn: Turn | None = None
    if session_id != ONE_OFF_SESSION:
        session, turn = sessions.begin(session_id)
        # Frees the session however the HTTP request ends, even when its lines never start (a client
        # gone before the stream began); in every other case the lines free it first, before the
        # client has read the end of the answer, so its next request never finds the session busy.
        asyncio.current_task().add_done_callback(lambda _: sessions.finish(session, turn))
    chars = len(body.prompt) if isinstance(body.prompt, str) else messages_chars(body.prompt)
    plan = await state.prepare_prompt(chars, functools.partial(_plan, state, body, session))
    runs = not plan.full and body.request_output_len != 0
    request = _request(state, body, plan, session, turn) if runs else None
    return _turn_lines(state, body, plan, request, session, turn)


def _plan(state: ServerState, body: InteractiveRequest, session: Session | None) -> _Plan:
    messages = [ChatMessage(role="user", content=body.prompt)] if isinstance(body.prompt, str) else body.prompt
    history = session.history if session is not None else []
    session_len = state.engine.max_session_len
    room = max(session_len - len(history) - 1, 0)  # the turn's tokens, leaving one for the answer
    try:
        turn = turn_tokens(state.engine.tokenizer, session, messages, state.settings.chat_template, room)
    except PromptTooLong as error:
        return _Plan(history, len(history), error.at_least, full=True)
    return _Plan(history + turn, len(history), len(turn), full=len(history) + len(turn) >= session_len)


def _request(
    state: ServerState, body: InteractiveRequest, plan: _Plan, session: Session | None, turn: Turn | None
) -> EngineRequest:
    engine = state.engine
    config = _generation_config(body, state.turn_end_ids)
    request_id = f"interactive-{uuid.uuid4().hex}"
    # A session's turn keeps its pages pinned when it finishes, for the next turn's prefill to reuse.
    session_id = str(session.session_id) if session is not None else None
    [request] = fan_out(engine, [plan.prompt_ids], config, 1, request_id, state.settings.max_log_len, session_id)
    if turn is not None:
        turn.request_id = request.request_id
    return request


def _generation_config(body: InteractiveRequest, turn_end_ids: frozenset[int]) -> GenerationConfig:
    ignore_eos = body.option("ignore_eos")
    stop = body.stop
    # The template's end of turn ends the answer like an EOS, as on /v1/chat/completions.
    turn_ends = frozenset() if ignore_eos else turn_end_ids
    return GenerationConfig(
        max_new_tokens=body.request_output_len,
        min_new_tokens=body.option("min_new_tokens") or 0,
        do_sample=True,  # temperature 0 is what asks for greedy decoding
        temperature=float(body.option("temperature")),
        top_p=float(body.option("top_p")),
        top_k=body.option("top_k"),
        min_p=float(body.option("min_p")),
        repetition_penalty=float(body.option("repetition_penalty")),
        random_seed=body.seed,
        ignore_eos=ignore_eos,
        stop_words=[stop] if isinstance(stop, str) else stop,
        stop_token_ids=sorted(turn_ends) or None,
        skip_special_tokens=body.option("skip_special_tokens"),
        spaces_between_special_tokens=body.option("spaces_between_special_tokens"),
    )


async def _turn_lines(
    state: ServerState,
    body: InteractiveRequest,
    plan: _Plan,
    request: EngineRequest | None,
    session: Session | None,
    turn: Turn | None,
) -> AsyncGenerator[dict[str, Any], None]:
    """The turn's lines; at the end the turn joins the session's history (interactive, and finished),
    or the session ends (not interactive), and the session is free again, all before the last line goes
    out: a client that sends its next turn the moment it reads that line finds the history recorded and
    the session free."""
    interactive = body.option("interactive_mode")
    released = False

    def release() -> None:
        nonlocal released
        if session is not None and turn is not None and not released:
            released = True
            state.sessions.finish(session, turn)
            if not interactive:
                state.sessions.end(session.session_id)

    try:
        if plan.full:
            message = _full_message(body.option("session_id"), plan, state.engine.max_session_len)
            release()
            yield _line("", 0, plan.input_tokens, plan.history_tokens, "length", message)
            return
        outcome = _Outcome()
        last = None  # the line with the finish reason, held back until the turn is recorded and released
        if request is None:  # request_output_len 0: the turn joins the history, nothing is generated
            outcome.finish_reason = "length"
            last = _line("", 0, plan.input_tokens, plan.history_tokens, "length")
        else:
            async with aclosing(_engine_lines(state.engine_client, request, plan, turn, outcome)) as lines:
                async for line in lines:
                    if line["finish_reason"] is not None:
                        last = line
                    else:
                        yield line
        if session is not None and interactive and outcome.finish_reason is not None:
            _record(session, plan, outcome, request)
        release()
        if last is not None:
            yield last
    finally:
        release()


async def _engine_lines(
    client: AsyncEngineClient, request: EngineRequest, plan: _Plan, turn: Turn | None, outcome: _Outcome
) -> AsyncGenerator[dict[str, Any], None]:
    """Run the request; a cancelled turn ends with an `abort` line instead of an error."""
    try:
        async with aclosing(generate(client, [request])) as deltas:
            async for _, delta in deltas:
                outcome.generated += delta.token_ids
                if turn is not None and turn.cancelled:
                    break  # cancelled before its engine request was known: leaving aborts it
                if delta.finished:
                    outcome.finish_reason = delta.finish_reason
                reason = outcome.finish_reason
                yield _line(delta.text, delta.num_completion_tokens, plan.input_tokens, plan.history_tokens, reason)
    except APIError as error:
        if turn is None or not turn.cancelled or error.code != "aborted":
            raise
    if turn is not None and turn.cancelled and outcome.finish_reason is None:
        yield _line("", len(outcome.generated), plan.input_tokens, plan.history_tokens, "abort")


def _record(session: Session, plan: _Plan, outcome: _Outcome, request: EngineRequest | None) -> None:
    generated = outcome.generated
    session.history = plan.prompt_ids + generated
    # The sampled end-of-turn token: the next turn's continuation, which starts with it, skips it.
    session.ends_on_stop = bool(
        request is not None
        and outcome.finish_reason == "stop"
        and generated
        and generated[-1] in request.stop_token_ids
    )


def _full_message(session_id: int, plan: _Plan, session_len: int) -> str:
    if session_id == ONE_OFF_SESSION:
        return (
            f"the prompt has at least {plan.input_tokens} tokens, which leaves no room for an answer in the session "
            f"length of {session_len}; send a shorter prompt"
        )
    return (
        f"session {session_id} is full: its {plan.history_tokens} tokens of history and this turn's "
        f"{plan.input_tokens} or more leave no room for an answer in the session length of {session_len}. End it with "
        f'{{"session_id": {session_id}, "interactive_mode": false, "prompt": "", "request_output_len": 0}} '
        "and start a new conversation"
    )
