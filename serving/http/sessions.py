"""Interactive sessions (`/v1/chat/interactive`): each session's token history, and how a turn extends it.

The engine keeps no history, only KV pages pinned under the session's id (which it may evict under
memory pressure: the next turn then recomputes them). The history lives here, as exactly the tokens
the model saw: every earlier prompt and every generated token. A turn's prompt is that history plus
the turn's own tokens, so the engine's page cache matches every whole page of the history and
prefills only what is new.

A later turn's tokens are the chat template's rendering of the new messages as a continuation of the
conversation: no BOS, no system prompt, just the end of the model's last answer (`<|im_end|>`,
`<|eot_id|>`, ...) and the new turns up to the generation prompt. Any Jinja template can render that:
render `[user, assistant: MARK] + new messages` and keep the text after the unique MARK. When the
model's answer ended on a stop token that is also the continuation's first token (the sampled
`<|im_end|>`), it is written once, so history + continuation is what rendering the whole conversation
gives. That holds token for token where the end-of-turn text is a special token (ChatML, Llama 3,
InternLM2); SentencePiece templates that put spaces around `</s>` (Llama 2, Mistral) can differ by a
space token at that seam, as any multi-turn prefix cache of them does.

One request at a time per session: a second one while a turn runs is refused (400 `session_busy`)
rather than interleaving two turns into one history. The registry holds at most `max_sessions`; a
new session beyond that ends the least recently used idle one, and a later request on that id is told
so once (400 `session_expired`) rather than silently starting over without its history.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.http.errors import APIError
from serving.http.prompts import chat_prompt
from serving.http.protocol import ChatMessage
from serving.text.templates import ChatTemplate
from serving.text.tokenizer import Tokenizer

# Each session keeps its history as Python ints (up to a session length each): bound the memory.
MAX_SESSIONS = 1024
# Stands for the model's last answer when rendering a continuation; nothing a user types looks like it.
TURN_MARK = "\x00xlserve-previous-answer\x00"


@dataclass(eq=False)
class Turn:
    """A request running on a session (one at a time)."""

    request_id: str | None = None  # the engine request's, once it is made
    cancelled: bool = False  # a `cancel` request aborted it: its answer is cut short, not an error
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set once the session is free again


@dataclass(eq=False)
class Session:
    session_id: int
    history: list[int] = field(default_factory=list)
    # The history ends on the stop token that ended the model's last answer (see `turn_tokens`).
    ends_on_stop: bool = False
    turn: Turn | None = None

    @property
    def busy(self) -> bool:
        return self.turn is not None


class SessionRegistry:
    """Sessions by id, for one server. Used on the event loop only, so it needs no lock."""

    def __init__(self, end_engine_session: Callable[[str], None], max_sessions: int = MAX_SESSIONS):
        self._end_engine_session = end_engine_session
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[int, Session] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[int, None] = OrderedDict()  # ids ended to make room, not yet told

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def begin(self, session_id: int) -> tuple[Session, Turn]:
        """Start a turn on the session (created if new); 400 if one is running or the session expired."""
        if session_id in self._expired:
            del self._expired[session_id]  # told once: the next request on this id starts anew
            raise APIError(
                400,
                f"session {session_id} was ended to make room for newer sessions (this server keeps at most "
                f"{self.max_sessions}), so its history is gone; send the conversation again to start it anew",
                param="session_id",
                code="session_expired",
            )
        session = self._sessions.get(session_id) or self._create(session_id)
        if session.busy:
            raise busy_error(session_id)
        session.turn = Turn()
        self._touch(session)
        return session, session.turn

    def finish(self, session: Session, turn: Turn) -> None:
        """The turn is over (however it ended). Idempotent, and a no-op once a later turn has begun.
        A session still without history (its first turn failed or was cancelled) is not kept."""
        if session.turn is not turn:
            return
        session.turn = None
        turn.ended.set()
        if session.history:
            self._touch(session)
        else:
            self._drop(session.session_id)

    def cancel(self, session_id: int) -> Turn | None:
        """Mark the session's running turn cancelled and return it (None if nothing runs)."""
        session = self._sessions.get(session_id)
        if session is None or session.turn is None:
            return None
        session.turn.cancelled = True
        return session.turn

    def end(self, session_id: int) -> int:
        """Forget the session and free its pinned pages; returns its history length (0 if unknown)."""
        session = self._sessions.get(session_id)
        if session is not None and session.busy:
            raise busy_error(session_id)
        self._expired.pop(session_id, None)
        return self._drop(session_id)

    def _create(self, session_id: int) -> Session:
        if len(self._sessions) >= self.max_sessions:
            self._make_room()
        session = self._sessions[session_id] = Session(session_id)
        return session

    def _make_room(self) -> None:
        idle = next((s.session_id for s in self._sessions.values() if not s.busy), None)
        if idle is None:
            raise APIError(
                503,
                f"all {self.max_sessions} interactive sessions are running a turn; retry when one has finished",
                code="too_many_sessions",
                headers={"Retry-After": "1"},
            )
        self._drop(idle)
        self._expired[idle] = None
        while len(self._expired) > self.max_sessions:
            self._expired.popitem(last=False)

    def _drop(self, session_id: int) -> int:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return 0
        self._end_engine_session(str(session_id))
        return len(session.history)

    def _touch(self, session: Session) -> None:
        self._sessions.move_to_end(session.session_id)  # the most recently used last


def busy_error(session_id: int) -> APIError:
    return APIError(
        400,
        f"session {session_id} is busy with another request; wait for it to finish, or cancel it with "
        f'{{"session_id": {session_id}, "cancel": true}}',
        param="session_id",
        code="session_busy",
    )


def turn_tokens(
    tokenizer: Tokenizer, session: Session | None, messages: list[ChatMessage], template: ChatTemplate | None,
    max_tokens: int | None = None,
) -> list[int]:
    """The tokens this turn adds to the session's history: the whole rendered prompt for a first turn,
    else the continuation (see the module's docstring). PromptTooLong past `max_tokens` (give or take
    the end-of-turn token the continuation may share with the history)."""
    if session is None or not session.history:
        return chat_prompt(tokenizer, messages, None, template, max_tokens=max_tokens).token_ids
    ids = continuation_ids(tokenizer, messages, template, None if max_tokens is None else max_tokens + 1)
    if session.ends_on_stop and ids and ids[0] == session.history[-1]:
        ids = ids[1:]
    return ids


def continuation_ids(tokenizer: Tokenizer, messages: list[ChatMessage], template: ChatTemplate | None,
                     max_tokens: int | None = None) -> list[int]:
    """`messages` rendered as a continuation after an assistant answer: from the template's end of that
    answer to the generation prompt, without BOS (PromptTooLong past `max_tokens`)."""
    placeholder = [ChatMessage(role="user", content="-"), ChatMessage(role="assistant", content=TURN_MARK)]
    text = chat_prompt(tokenizer, placeholder + messages, None, template).text
    _, mark, after = text.partition(TURN_MARK)
    if not mark or TURN_MARK in after:
        raise APIError(
            400,
            "this server's chat template cannot continue a conversation turn by turn; "
            "send the whole conversation with interactive_mode false",
            param="interactive_mode",
            code="template_cannot_continue",
        )
    if max_tokens is None:
        return tokenizer.encode(after, add_special_tokens=False)
    return tokenizer.encode_at_most(after, max_tokens, add_special_tokens=False)
