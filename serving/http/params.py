"""OpenAI sampling fields → the engine's `GenerationConfig`, and the context-length check.

Defaults follow OpenAI where the client left a field out, except that a checkpoint's
generation_config.json (temperature, top_p, top_k, repetition_penalty) takes precedence, as the
model's authors tuned those values for it (LMDeploy's `--generation-config auto`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from serving.http.errors import APIError
from serving.http.protocol import SamplingFields
from serving.request import GenerationConfig
from serving.text.bad_words import bad_word_spellings
from serving.text.tokenizer import PromptTooLong, Tokenizer

OPENAI_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
}


def generation_config(body: SamplingFields, model_defaults: Mapping[str, float | int],
                      tokenizer: Tokenizer) -> GenerationConfig:
    def pick(name: str) -> float | int:
        value = getattr(body, name)
        if value is not None:
            return value
        return model_defaults.get(name, OPENAI_DEFAULTS[name])

    top_k = int(pick("top_k"))
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return GenerationConfig(
        max_new_tokens=max_new_tokens(body),
        min_new_tokens=body.min_new_tokens or body.min_tokens or 0,
        do_sample=True,  # temperature 0 is what asks for greedy decoding here
        temperature=float(pick("temperature")),
        top_p=float(pick("top_p")),
        top_k=0 if top_k == -1 else top_k,  # -1 is vLLM's spelling of "off"
        min_p=body.min_p or 0.0,
        repetition_penalty=float(pick("repetition_penalty")),
        presence_penalty=float(body.presence_penalty or 0.0),
        frequency_penalty=float(body.frequency_penalty or 0.0),
        logit_bias={int(token): float(value) for token, value in body.logit_bias.items()} or None
        if body.logit_bias else None,
        bad_token_ids=bad_word_spellings(tokenizer, body.bad_words)[0] or None if body.bad_words else None,
        random_seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
        stop_words=stop or None,
        stop_token_ids=body.stop_token_ids or None,
        skip_special_tokens=body.skip_special_tokens is not False,
        spaces_between_special_tokens=body.spaces_between_special_tokens is not False,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
    )


def max_new_tokens(body: SamplingFields) -> int | None:
    """`max_completion_tokens` (the newer name) over `max_tokens`; None runs up to the session length."""
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def fit_context_length(
    prompts: Sequence[list[int]], requested: int | None, session_len: int, param: str, strict: bool
) -> int | None:
    """The completion limit to run with: a prompt that leaves no room is a 400; a `max_tokens` beyond
    the room left is, with `strict` (`--strict-context-length`), a 400 as OpenAI answers, else capped so
    that the completion runs up to the session length and finishes with `length`, as LMDeploy's guide says."""
    counted = strict and requested is not None  # else only one new token must fit
    for prompt_ids in prompts:
        completion = requested if counted else 1
        if len(prompt_ids) + completion > session_len:
            raise APIError(
                400,
                f"This model's maximum context length is {session_len} tokens. However, you requested "
                f"{len(prompt_ids) + completion} tokens ({len(prompt_ids)} in the {param}, "
                f"{completion if counted else 'at least 1'} in the completion). "
                f"Please reduce the length of the {param} or of the completion.",
                param=param if len(prompt_ids) >= session_len else "max_tokens",
                code="context_length_exceeded",
            )
    # The engine caps each choice at its own prompt's room; any count past the session length means the same.
    return None if requested is None else min(requested, session_len)


def prompt_too_long(error: PromptTooLong, session_len: int, param: str) -> APIError:
    """A prompt found too long before it was tokenized in full: a 400 as `fit_context_length`'s."""
    return APIError(
        400,
        f"This model's maximum context length is {session_len} tokens. However, your {param} has more than "
        f"{error.limit} tokens (at least {error.at_least}; it was not tokenized in full), leaving no room for "
        f"the completion. Please reduce the length of the {param}.",
        param=param,
        code="context_length_exceeded",
    )
