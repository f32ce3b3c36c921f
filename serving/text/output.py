"""Engine outputs to client-facing text for one request: detokenize, then match stop strings."""

from __future__ import annotations

from dataclasses import dataclass

from serving.request import EngineOutput, EngineRequest, FinishReason, GenerationConfig, TokenLogprob
from serving.text.detokenizer import IncrementalDetokenizer
from serving.text.stop import StopStringMatcher
from serving.text.tokenizer import Tokenizer


@dataclass
class TextDelta:
    """What one engine output adds to a request's result.

    `text` and `token_ids` are new since the previous delta; `num_completion_tokens` is the running
    total (the usage count). `finish_reason` is "stop", "length", "abort" or "error" once finished.
    `num_cached_tokens`: prompt tokens the engine took from its prefix cache instead of computing.
    """

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_completion_tokens: int
    num_cached_tokens: int = 0
    # With logprobs: one entry per token of `token_ids`, and the text each token added to the answer
    # (`token_texts`; "" for a byte that only completes a character later), for text offsets.
    logprobs: list[TokenLogprob] | None = None
    token_texts: list[str] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # new prompt entries (from its second token on)
    # With token_ids: when the engine produced the first and the last of them (`EngineOutput.produced_at`)
    token_times: tuple[float, float] | None = None
    embedding: list[float] | None = None  # an embedding request's answer (`EngineOutput.embedding`)


class OutputProcessor:
    """Turns one request's stream of `EngineOutput`s into `TextDelta`s.

    A stop string ends the request on the text side: the delta comes back `finished=True,
    finish_reason="stop"` while the engine may still be running it, so the caller must
    `engine.abort(request_id)`. Tokens after the one that completed the stop string are neither
    counted nor returned. Once finished, any later output (the engine's answer to that abort) yields
    an empty delta with the same finish reason.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], config: GenerationConfig):
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_ids,
            skip_special_tokens=config.skip_special_tokens,
            spaces_between_special_tokens=config.spaces_between_special_tokens,
        )
        self._stop = StopStringMatcher(config.stop_words or [], config.include_stop_str_in_output)
        self._include_stop = config.include_stop_str_in_output
        self._num_tokens = 0
        self._num_cached = 0
        self._finish_reason: str | None = None

    def process(self, out: EngineOutput) -> TextDelta:
        if self._finish_reason is not None:
            return TextDelta("", [], True, self._finish_reason, self._num_tokens, self._num_cached)
        texts: list[str] = []
        self._num_cached = max(self._num_cached, out.num_cached_tokens)
        ids = list(out.new_token_ids)
        # The engine stopped on an EOS or stop token id, which is the last new token. Like vLLM, its
        # text is left out unless the request asked for stop text; it is still counted and returned.
        drop_last = out.finished and out.finish_reason == FinishReason.STOP and not self._include_stop
        text_ids = ids[:-1] if drop_last and ids else ids
        pieces: list[str] = []
        stopped = False
        # One token at a time, so a stop string is pinned to the token that completed it.
        for n, token_id in enumerate(text_ids, 1):
            text = self._detokenizer.push([token_id])
            texts.append(text)
            piece, stopped = self._stop.push(text)
            pieces.append(piece)
            if stopped:
                ids = ids[:n]
                break
        if not stopped and out.finished:
            # The end of the stream: release text held for an unfinished character or a possible
            # stop string (a stop string can still complete in that last text).
            piece, stopped = self._stop.push(self._detokenizer.flush())
            pieces.append(piece if stopped else piece + self._stop.flush())
        self._num_tokens += len(ids)
        if stopped:
            self._finish_reason = FinishReason.STOP.value
        elif out.finished:
            self._finish_reason = FinishReason(out.finish_reason).value
        finished = self._finish_reason is not None
        delta = TextDelta("".join(pieces), ids, finished, self._finish_reason, self._num_tokens, self._num_cached,
                          prompt_logprobs=out.prompt_logprobs, embedding=out.embedding)
        if out.logprobs is not None:
            delta.logprobs = out.logprobs[: len(ids)]  # a stop string cuts both
            delta.token_texts = (texts + [""] * len(ids))[: len(ids)]  # a dropped stop token adds no text
        return delta


class RequestFailed(RuntimeError):
    """The engine ended a request with an error (the step running it failed, or the engine did)."""

    def __init__(self, request_id: str, error: str | None):
        super().__init__(f"the engine failed request {request_id}: {error}")
        self.request_id = request_id
        self.error = error


class RequestTracker:
    """The client side of several engine requests at once (a request's `n` choices, a pipeline batch):
    each output to text through its request's `OutputProcessor`, shared by the HTTP routes and `pipeline()`.

    `process` answers `(delta, request id to abort)`: the delta is None for what follows a request's end
    (the engine's echo of an abort), and a stop string ends a request on the text side while the engine
    still runs it, so the caller must abort that id. Requests still `pending` when the caller stops
    (a disconnect, an error, an early break) are the caller's to abort.
    """

    def __init__(self, tokenizer: Tokenizer, requests: list[EngineRequest]):
        self.requests = requests
        self._processors = [OutputProcessor(tokenizer, r.prompt_token_ids, r.config) for r in requests]
        self._pending = set(range(len(requests)))

    @property
    def pending(self) -> list[int]:
        """Indices of the requests not finished yet."""
        return sorted(self._pending)

    def process(self, index: int, output: EngineOutput) -> tuple[TextDelta | None, str | None]:
        """Raises RequestFailed when the engine failed the request."""
        if index not in self._pending:
            return None, None
        request = self.requests[index]
        if output.finish_reason is FinishReason.ERROR or output.error is not None:
            self._pending.discard(index)
            raise RequestFailed(request.request_id, output.error)
        delta = self._processors[index].process(output)
        if not delta.finished:
            return delta, None
        self._pending.discard(index)
        return delta, None if output.finished else request.request_id
