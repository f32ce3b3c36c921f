"""The one interface the server and the offline pipeline use to drive an engine, wherever it runs.

`Engine` (a thread of this process) and `EngineProcess` (a child process that owns the accelerator)
both satisfy `EngineClient`; callers hold an `EngineClient` and never ask which one they have.
`EngineStats` is what `stats()` answers: typed fields, not dict keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from model.config import ModelConfig
from serving.engine.config import EngineConfig
from serving.engine.progress import StartupListener
from serving.request import EngineOutput, EngineRequest, GenerationConfig

if TYPE_CHECKING:  # the tokenizer's module imports transformers (and torch): seconds the engine process saves
    from serving.text.tokenizer import Tokenizer

Sink = Callable[[EngineOutput], None]


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences in the engine's queue
    num_pages_total: int  # usable KV pages
    num_pages_used: int  # pages some sequence or session holds
    num_cached_pages: int  # unreferenced pages kept for their contents (prefix cache)
    num_pinned_sessions: int  # interactive sessions whose pages stay pinned
    num_preemptions: int  # since start
    prefix_cache_hits: int  # prompt tokens taken from the prefix cache, since start
    prompt_tokens_computed: int  # prompt tokens prefilled (or recomputed), since start
    shared_prefix_steps: int  # decode steps with at least one shared-prefix tile
    shared_prefix_rows: int  # rows in a tile, summed over those steps
    compilations_after_warmup: int  # XLA compilations after start-up (anything but 0 is a bug)
    mixed_steps: int = 0  # steps that ran decoding rows and prompt chunks as one program (--mixed-decode-buckets)
    startup_buckets_remaining: int = 0  # buckets (and sampler branches) still compiling in the background
    startup_buckets_unrun: int = 0  # compiled buckets the engine has not yet run once (it does while idle)


class EngineClient(Protocol):
    """What the HTTP layer and `pipeline()` need of an engine; `Engine` and `EngineProcess` provide it."""

    model_path: str | None
    engine_config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    max_session_len: int
    max_batch_size: int
    page_size: int
    dtype_name: str  # the serving dtype, e.g. "bfloat16"
    quantization_name: str  # what is stored quantized, e.g. "int8 weights, int8 KV" ("" for nothing)
    ready: bool
    compile_seconds: float
    on_startup: StartupListener | None  # hears of start-up progress (serving.engine.progress)
    step_listeners: list[Callable[[], None]]  # called after each engine step has reported its outputs
    # time.monotonic() when the engine last showed progress: a loop turn, which an idle engine still
    # makes about once a second. Standing still while requests wait means the engine is stuck.
    heartbeat: float

    @property
    def alive(self) -> bool: ...

    def start(self, serve_early: bool = False) -> None: ...  # see Engine.start

    def shutdown(self) -> None: ...

    def make_request(self, prompt_token_ids: list[int], config: GenerationConfig, request_id: str,
                     session_id: str | None = None) -> EngineRequest: ...

    def submit(self, request: EngineRequest, sink: Sink) -> None: ...

    def abort(self, request_id: str) -> None: ...  # never blocks nor raises; nothing once the engine has ended

    def end_session(self, session_id: str) -> None: ...  # likewise

    def stats(self) -> EngineStats: ...  # never waits for the engine: safe on an event loop

    def start_profile(self, directory: str) -> None: ...

    def stop_profile(self) -> None: ...
