"""What a caller asks of the engine and what the engine answers, as plain host-side records.

`GenerationConfig` is the user-facing set of sampling options (named like LMDeploy's), validated once
at the boundary so the engine never sees a nonsensical value. `EngineRequest` is one sequence to run;
`EngineOutput` is what the engine thread reports after each step it advanced that sequence.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

import numpy as np

from serving.sampling_options import declared_options, option

# Fixed width of the per-row "stop token" table handed to the jitted sampler (min_new_tokens bans
# these ids until enough tokens exist). More distinct stop ids than this are refused up front.
MAX_STOP_TOKEN_IDS = 16
MAX_SEED = 2**63 - 1
# Integer options travel to the device as int32; anything larger is refused, never silently wrapped.
MAX_INT32 = 2**31 - 1
# The sampler computes this many most likely tokens' log probabilities for every row that asks (a fixed
# width, so no request recompiles anything); OpenAI's chat allows up to 20 `top_logprobs`.
MAX_LOGPROBS = 20
# OpenAI's limit on logit_bias entries; bad_token_ids share the same per-row table.
MAX_LOGIT_BIAS = 300


class InvalidRequestError(ValueError):
    """A request the engine refuses; `param` names the offending option."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class GenerationConfig:
    """Sampling and stopping options for one request (LMDeploy's names).

    `do_sample=False` (the default, as in LMDeploy's pipeline) means greedy decoding whatever the
    temperature; `temperature=0` is greedy as well. `top_k=0` and `top_p=1` switch those filters off.
    Numeric options are declared with `option(...)` (serving/sampling_options.py says how to add one):
    their range is checked by `validate`, and those with `column=True` reach the sampler per row.
    """

    max_new_tokens: int | None = option(512, low=0, high=MAX_INT32)
    min_new_tokens: int = option(0, low=0, high=MAX_INT32)
    do_sample: bool = False
    temperature: float = option(0.8, low=0.0, high=100.0, api_high=2.0, column=True, neutral=0.0,
                                 row=lambda config: 0.0 if config.greedy else config.temperature)
    top_p: float = option(1.0, low=0.0, high=1.0, low_open=True, column=True)
    top_k: int = option(0, low=0, high=MAX_INT32, column=True, why="0 disables it")
    min_p: float = option(0.0, low=0.0, high=1.0, column=True)
    repetition_penalty: float = option(1.0, low=0.0, high=100.0, low_open=True, api_high=10.0, column=True)
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), over generated tokens
    presence_penalty: float = option(0.0, low=-2.0, high=2.0, column=True)
    frequency_penalty: float = option(0.0, low=-2.0, high=2.0, column=True)
    # Log probabilities of each generated token and of this many most likely ones (None: none at all)
    logprobs: int | None = option(None, low=0, high=MAX_LOGPROBS, column=True, neutral=-1)
    # The same at every prompt position but the first (None: none; the prompt is prefilled a token a row)
    prompt_logprobs: int | None = option(None, low=0, high=MAX_LOGPROBS)
    random_seed: int | None = option(None, low=0, high=MAX_SEED)
    ignore_eos: bool = False
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    # token id -> value added to its logit, OpenAI's logit_bias (at most MAX_LOGIT_BIAS entries)
    logit_bias: dict[int, float] | None = None
    bad_token_ids: list[int] | None = None  # never generated (LMDeploy's name); share logit_bias's table
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise `InvalidRequestError` naming the first option that is out of range."""

        def check(ok: bool, param: str, why: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        for declared in declared_options(GenerationConfig):
            value = getattr(self, declared.name)
            if value is None and declared.nullable:
                continue
            problem = declared.spec.problem(value, declared.kind)
            check(problem is None, declared.name, problem or "")
        if self.stop_words is not None:
            check(isinstance(self.stop_words, list) and all(isinstance(s, str) and s for s in self.stop_words),
                  "stop_words", "must be a list of non-empty strings")
        in_vocab = "" if vocab_size is None else f" in [0, {vocab_size})"
        for name in ("stop_token_ids", "bad_token_ids"):
            ids = getattr(self, name)
            if ids is not None:
                check(isinstance(ids, list) and all(_is_token(i, vocab_size) for i in ids), name,
                      f"must be a list of token ids{in_vocab}")
        if self.stop_token_ids is not None:
            check(len(set(self.stop_token_ids)) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
                  f"may hold at most {MAX_STOP_TOKEN_IDS} ids")
        if self.logit_bias is not None:
            bias = self.logit_bias
            check(isinstance(bias, dict) and all(_is_token(i, vocab_size) for i in bias), "logit_bias",
                  f"must map token ids{in_vocab} to numbers")
            check(all(isinstance(v, int | float) and not isinstance(v, bool) and -100 <= v <= 100
                      for v in bias.values()), "logit_bias", "values must be numbers in [-100, 100]")
        entries = len(self.logit_bias or {}) + len(set(self.bad_token_ids or []))
        if entries > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias and bad_token_ids may hold at most {MAX_LOGIT_BIAS} token ids "
                                      f"together, got {entries}",
                                      param="logit_bias" if self.logit_bias else "bad_words")


def _is_token(value: object, vocab_size: int | None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (
        vocab_size is None or 0 <= value < vocab_size)


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an EOS / stop token id, or a stop string (matched by the text layer)
    LENGTH = "length"  # max_new_tokens or the session length
    ABORT = "abort"  # cancelled by the caller (client disconnect, stop string, shutdown)
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """A regular constraint compiled to tokens (`serving.text.grammar`), which the engine runs on the device.

    Tokens that act alike in every state share a class, so the tables stay small whatever the vocabulary:
    `transitions[state, token_class[token]]` is the next state, -1 where the token is not allowed. The
    end tokens (the request's stop ids) have a class of their own, allowed (and looping) exactly in final
    states. `key` names the constraint and the end ids: equal keys mean equal tables.
    """

    key: str
    token_class: np.ndarray  # i32[V]
    transitions: np.ndarray  # i32[S, C]
    initial: int

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    def walk(self, tokens: list[int]) -> int:
        """The state after `tokens` from the initial one (-1 once a token is not allowed)."""
        state = self.initial
        for token in tokens:
            if state < 0:
                break
            state = int(self.transitions[state, self.token_class[token]])
        return state


@dataclass(frozen=True)
class HostGrammar:
    """A constraint the engine runs on the host with llguidance: a grammar that is not regular (recursive
    JSON schemas, Lark/EBNF), or any constraint a request sent to the host path. `kind` is llguidance's
    (`json_schema`, `regex`, `lark`); `automaton` is set instead for a regular constraint run on the host
    from the same tables as the device path (`guided_decoding_backend: host`)."""

    key: str
    kind: str
    source: str
    end_ids: frozenset[int]
    automaton: TokenAutomaton | None = None


Guide = TokenAutomaton | HostGrammar


@dataclass
class EngineRequest:
    """One sequence for the engine. `n>1` fan-out happens above the engine (one request per choice)."""

    request_id: str
    prompt_token_ids: list[int]
    config: GenerationConfig
    # Token ids that end the sequence (the model's EOS set plus the request's stop_token_ids).
    stop_token_ids: frozenset[int] = frozenset()
    # Seed actually used (chosen at random when the user gave none), so a rerun can reproduce it.
    seed: int = 0
    # An interactive session this request is a turn of: its KV pages stay pinned under this id when
    # it finishes, and it reuses cached pages even with prefix caching off (see scheduler).
    session_id: str | None = None
    # A structured-output constraint on every generated token (None: unconstrained).
    guide: Guide | None = None
    # Set by the engine when an automaton that should run on the device runs on the host (a full pool).
    masked_on_host: bool = False
    # An embedding request: the prompt is prefilled and the answer is the hidden state the LM head reads at
    # its last token (`EngineOutput.embedding`), instead of generated tokens.
    embed: bool = False

    @property
    def guided_on_host(self) -> bool:
        """Its masks come from the host, which must have read its last token before the next step."""
        return isinstance(self.guide, HostGrammar) or self.masked_on_host


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log probability at its position, and the most likely tokens there (as many as asked),
    most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class EngineOutput:
    """What one engine step produced for one request. `logprobs`, when the request asked for them, has
    one entry per new token; `prompt_logprobs` continues the prompt's (from its second token on)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    # time.monotonic() when the engine had the step's tokens back (0.0 on outputs of no step): the clock the
    # server's metrics time tokens by, which an engine in a process of its own shares (CLOCK_MONOTONIC)
    produced_at: float = 0.0
    # An embedding request's answer, on its final output: the final norm's output at the prompt's last token
    embedding: list[float] | None = None


def build_request(
    prompt_token_ids: list[int],
    config: GenerationConfig,
    request_id: str,
    session_id: str | None,
    *,
    vocab_size: int,
    eos_token_ids: frozenset[int],
    max_session_len: int,
) -> EngineRequest:
    """Validate a request against the engine's limits and fill in its stop ids and seed; raises
    InvalidRequestError. Shared by `Engine` and `EngineProcess`, whose server side validates before it
    sends anything to the engine's process."""
    config.validate(vocab_size)
    if not prompt_token_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
    if len(prompt_token_ids) >= max_session_len:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_token_ids)} tokens, but the session length is {max_session_len} "
            "and at least one token must be generated",
            param="prompt", code="context_length_exceeded",
        )
    stops = set(config.stop_token_ids or [])
    if not config.ignore_eos:
        stops |= eos_token_ids
    if config.min_new_tokens and len(stops) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(
            f"min_new_tokens holds back at most {MAX_STOP_TOKEN_IDS} stop token ids; this request has {len(stops)}",
            param="stop_token_ids",
        )
    seed = config.random_seed if config.random_seed is not None else secrets.randbelow(MAX_SEED + 1)
    return EngineRequest(request_id, list(prompt_token_ids), config, frozenset(stops), seed, session_id)
