"""Log probabilities in OpenAI's two shapes: chat's `logprobs.content` and the legacy completions' four lists.

The engine reports each token's log probability and its top alternatives as ids (`TokenLogprob`); here
they get their text: a token's own piece (`Tokenizer.token_piece`, with its leading space) for `token`,
`bytes` and the keys of `top_logprobs`, and for completions' `text_offset` the text each token added to the
answer, so that offsets index the returned `text`. JSON has no -inf: a token that a sampling filter
removed (`--logprobs-mode processed`) shows OpenAI's and vLLM's floor, -9999.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from serving.http.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from serving.request import TokenLogprob
from serving.text.detokenizer import IncrementalDetokenizer
from serving.text.tokenizer import Tokenizer

FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """`choices[i].logprobs` of a chat answer (or of one stream chunk: its tokens only)."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text, raw = tokenizer.token_piece(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(raw))

    content = []
    for entry in entries:
        chosen = top(entry.token_id, entry.logprob)
        content.append(ChatTokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                        top_logprobs=[top(i, lp) for i, lp in entry.top]))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob | None], texts: Sequence[str],
                        offset: int = 0, first_token_id: int | None = None) -> CompletionLogprobs:
    """`choices[i].logprobs` of a completion: `entries[i]` for the token that added `texts[i]`, its text
    starting at `offset` + the texts before it. A None entry is an echoed prompt's first token (its id
    `first_token_id`), which has no log probability."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry, text in zip(entries, texts, strict=True):
        if entry is None:
            tokens.append(tokenizer.token_piece(first_token_id)[0] if first_token_id is not None else "")
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            tokens.append(tokenizer.token_piece(entry.token_id)[0])
            token_logprobs.append(_finite(entry.logprob))
            top_logprobs.append({tokenizer.token_piece(i)[0]: _finite(lp) for i, lp in entry.top})
        text_offset.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=text_offset)


def prompt_texts(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> list[str]:
    """The text each prompt token adds to the decoded prompt, special tokens included (their concatenation
    is the echoed prompt); the last token's also holds whatever the decoder kept back to the end."""
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    texts = [detokenizer.push([token_id]) for token_id in prompt_ids]
    texts[-1] += detokenizer.flush()
    return texts


def cumulative_logprob(entries: Sequence[TokenLogprob]) -> float:
    """The sum of a choice's token log probabilities: how `best_of` ranks choices."""
    return sum(entry.logprob for entry in entries)
