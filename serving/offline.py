"""The offline Python API, shaped like LMDeploy's `pipeline`: the same engine the server runs, in-process.

    from serving import pipeline, GenerationConfig
    pipe = pipeline("/path/to/hf-checkpoint", session_len=4096)  # or a hub id: pipeline("org/name")
    pipe(["Hi,", "The capital of France is"], gen_config=GenerationConfig(max_new_tokens=32))

A prompt is a string (encoded as is, with the tokenizer's BOS), a list of token ids, or a chat (a list
of `{"role", "content"}` messages, rendered with the checkpoint's chat template). A list of prompts
gives a list of responses, in order. `pipe.embed(prompts)` gives their embeddings instead (POST /v1/embeddings').
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field

from model.source import resolve_model
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.request import EngineOutput, EngineRequest, GenerationConfig, InvalidRequestError
from serving.text.output import RequestTracker, TextDelta
from serving.text.pooling import pooled

Prompt = str | list[int] | list[dict]


@dataclass
class Response:
    """One prompt's result (or, from `stream_infer`, one increment of it)."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    index: int = 0


class Pipeline:
    def __init__(
        self,
        model_path: str | None = None,
        *,
        revision: str | None = None,
        download_dir: str | None = None,
        **engine_options: object,
    ):
        config = EngineConfig.from_options(**engine_options)
        if model_path is not None:
            model_path = resolve_model(model_path, revision, download_dir, weights=config.load_format != "dummy")
        elif revision is not None or download_dir is not None:
            raise ValueError("revision and download_dir apply to a hub id; no model was given (the demo model)")
        self.engine = Engine.from_pretrained(model_path, config)
        self.engine.start()
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    # ----- capacity the engine allocated -----
    @property
    def num_pages(self) -> int:
        return self.engine.stats().num_pages_total

    @property
    def page_size(self) -> int:
        return self.engine.page_size

    @property
    def max_cached_tokens(self) -> int:
        return self.num_pages * self.page_size

    # ----- generation -----
    def __call__(
        self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | list[GenerationConfig] | None = None
    ) -> Response | list[Response]:
        single = _is_single(prompts)
        batch = _batch(prompts)
        results = [Response("", 0, 0, index=i) for i in range(len(batch))]
        for delta in self.stream_infer(batch, gen_config):
            result = results[delta.index]
            result.text += delta.text
            result.token_ids += delta.token_ids
            result.generate_token_len = delta.generate_token_len
            result.input_token_len = delta.input_token_len
            result.finish_reason = delta.finish_reason
        return results[0] if single else results

    def stream_infer(
        self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | list[GenerationConfig] | None = None
    ) -> Iterator[Response]:
        """Yield increments (`text`/`token_ids` hold only what is new) as the engine produces them."""
        batch = _batch(prompts)
        configs = gen_config if isinstance(gen_config, list) else [gen_config or GenerationConfig()] * len(batch)
        if len(configs) != len(batch):
            raise InvalidRequestError(f"got {len(configs)} gen_configs for {len(batch)} prompts", param="gen_config")
        requests = self._requests(batch, configs)
        for index, delta in self._deltas(requests):
            yield Response(delta.text, delta.num_completion_tokens, len(requests[index].prompt_token_ids),
                           delta.finish_reason, delta.token_ids, index)

    # ----- embeddings -----
    def embed(self, prompts: Prompt | list[Prompt], dimensions: int | None = None) -> list[float] | list[list[float]]:
        """Each prompt's embedding, as POST /v1/embeddings computes it: the final norm's output at its last token,
        (its first `dimensions` values) at unit length (`serving.text.pooling`). A list of prompts gives a list."""
        batch = _batch(prompts)
        requests = self._requests(batch, [GenerationConfig(max_new_tokens=0)] * len(batch))
        for request in requests:
            request.embed = True
        vectors: list[list[float]] = [[] for _ in batch]
        for index, delta in self._deltas(requests):
            if delta.embedding is not None:
                vectors[index] = pooled(delta.embedding, dimensions).tolist()
        return vectors[0] if _is_single(prompts) else vectors

    def _requests(self, batch: list[Prompt], configs: list[GenerationConfig]) -> list[EngineRequest]:
        # Validate everything before submitting anything, so a bad prompt leaves nothing running.
        return [self.engine.make_request(self._encode(prompt), config, f"pipe-{next(self._ids)}")
                for prompt, config in zip(batch, configs, strict=True)]

    def _deltas(self, requests: list[EngineRequest]) -> Iterator[tuple[int, TextDelta]]:
        """Run `requests`, yielding (index, what it added) as the engine produces it; aborts what is left when the
        caller stops early or a request fails."""
        tracker = RequestTracker(self.tokenizer, requests)
        outputs: queue.SimpleQueue[tuple[int, EngineOutput]] = queue.SimpleQueue()
        try:
            for index, request in enumerate(requests):
                self.engine.submit(request, lambda out, i=index: outputs.put((i, out)))
            while tracker.pending:
                index, out = outputs.get()
                delta, to_abort = tracker.process(index, out)
                if to_abort is not None:
                    self.engine.abort(to_abort)
                if delta is not None:
                    yield index, delta
        finally:
            for index in tracker.pending:  # the caller stopped iterating early, or a request failed
                self.engine.abort(requests[index].request_id)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompts")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt), add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidRequestError(
            "a prompt must be a string, a list of token ids or a list of chat messages", param="prompts"
        )

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    batch = [prompts] if _is_single(prompts) else list(prompts)
    if not batch:
        raise InvalidRequestError("no prompts given", param="prompts")
    return batch


def _is_single(prompts: object) -> bool:
    """A string, a token-id list and a chat are one prompt; a list of those is a batch."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, list) and prompts:
        return all(isinstance(p, int) for p in prompts) or all(isinstance(p, dict) for p in prompts)
    return False


def pipeline(
    model_path: str | None = None,
    *,
    revision: str | None = None,
    download_dir: str | None = None,
    **engine_options: object,
) -> Pipeline:
    """Load a local Hugging Face checkpoint or a hub id `org/name` (downloaded first, at `revision`, into
    the Hugging Face cache or `download_dir`; see model.source), or with neither the built-in demo model,
    and compile it."""
    return Pipeline(model_path, revision=revision, download_dir=download_dir, **engine_options)
