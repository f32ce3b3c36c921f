"""The engine: loads a model, owns the scheduler and the runner, and runs them on its own thread.

Callers on any thread `submit` requests with a sink and may `abort` them; the engine thread alone
touches the scheduler and the device. Each loop turn it takes what arrived, asks the scheduler for a
plan, dispatches the decode batch and the prefill batch back to back, then reads both results and
reports each sequence's new token through its sink. The sink runs on the engine thread and must not
block (the HTTP layer hands outputs to its event loop with `call_soon_threadsafe`).

Faults: an exception while dispatching or reading back a step fails only that step's requests (each
gets a final output with `FinishReason.ERROR`) and the loop goes on. If steps keep failing
(`MAX_CONSECUTIVE_STEP_FAILURES` in a row: the device or its state is broken), or anything else
escapes the loop, the thread ends: every request fails, `ready` and `alive` turn false, and `submit`
refuses new work instead of queueing it where nobody would ever answer.

`timeline`, when set to a list, gets one `TurnRecord` per loop turn (host timestamps and the turn's
sizes): `tools/bench_engine.py --timeline` uses it to show which phase of a run costs what, and whether
the host or the device sets the pace. Left as None, it costs a few clock reads a turn.

`fault_hook` is for tests only: a callable the engine thread calls with a step's chunks just before
dispatching it, to make that step fail (raise) or run slowly (sleep) with the real engine. It is a
plain attribute, set in-process; no flag, variable or request can set it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from model.config import ModelConfig
from model.llama import kv_bytes_per_token
from model.loader import init_random_params, load_params
from model.sharding import make_mesh
from model.weight_quant import is_block_format
from serving.engine.checkpoint_text import load_tokenizer, stop_ids
from serving.engine.client import EngineStats
from serving.engine.compile_cache import enable_compilation_cache
from serving.engine.config import EngineConfig, StepShape
from serving.engine.multihost import PeerLost, PlanBroadcaster, exit_after_grace, join, resolve_group
from serving.engine.pages import PageAllocator
from serving.engine.progress import StartupListener, buckets_reporter, weights_reporter
from serving.engine.runner import ModelRunner, StepOutput
from serving.engine.scheduler import Chunk, Scheduler
from serving.engine.warmup import BucketCompiler, CompileUnit, on_startup_thread
from serving.request import EngineOutput, EngineRequest, FinishReason, GenerationConfig, build_request
from xlkernels.kv_quant import BF16_BITS, kv_format
from xlkernels.native_build import cpu_has_bf16_dots

if TYPE_CHECKING:
    from serving.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# KV budget on a CPU backend, where "free accelerator memory" means nothing: this many bytes times
# cache_max_entry_count, and never more pages than max_batch_size full-length sequences can use.
CPU_KV_CACHE_BYTES = 1 << 30

# Steps failing back to back mean the device (or the donated state) is broken, not one bad request.
MAX_CONSECUTIVE_STEP_FAILURES = 3

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclass(frozen=True)
class TurnRecord:
    """One engine loop turn, in `time.perf_counter` seconds. `device_ready - dispatched` is how long the
    host waited for the previous turn's step: near zero on every turn means the host sets the pace."""

    start: float  # before scheduling
    dispatched: float  # this turn's steps queued on the device
    device_ready: float  # the previous turn's steps done on the device
    read: float  # their tokens handed to the sinks
    decode_rows: int
    prefill_tokens: int


def _wait_quietly(dispatched: list[tuple[list[Chunk], StepOutput]]) -> None:
    """Block until dispatched steps are done on the device; a failed one is left to the read-back to report."""
    try:
        jax.block_until_ready([output.tokens for _, output in dispatched])
    except Exception:
        pass


def resolve_dtype(name: str, model_config: ModelConfig, platform: str) -> jnp.dtype:
    """The activations' dtype. `auto` is the checkpoint's dtype on accelerators and float32 on CPU, where bf16
    matmuls are slow and less exact; on CPU, bf16 weights and GGUF blocks (model/weight_quant.py) always run
    under float32."""
    if platform == "cpu" and (model_config.weight_quant == "bf16" or is_block_format(model_config.weight_quant)):
        return jnp.dtype(jnp.float32)
    if name == "auto":
        name = "float32" if platform == "cpu" else model_config.torch_dtype
        name = name if name in _DTYPES else "bfloat16"
    return _DTYPES[name]


def with_weight_quant(model_config: ModelConfig, weight_quant: str | None, head_quant: str | None = None
                      ) -> ModelConfig:
    """The model as it will be stored: --weight-quant overrides the checkpoint's own format (an FP8
    checkpoint's weights are read back at full precision, then quantized like any other); --lm-head-quant
    quantizes the LM head too (ModelConfig's checks refuse a tied head and the CPU's formats)."""
    return dataclasses.replace(model_config, weight_quant=weight_quant or model_config.weight_quant,
                               head_quant=head_quant)


def default_weight_format(dtype: str, checkpoint: ModelConfig, platform: str, bf16_dots: bool) -> str | None:
    """The weight format when --weight-quant is unset, on CPU (None elsewhere: the activations' dtype):
    - bf16 (bfloat16 weights and KV pages under float32 activations) for --dtype bfloat16, whose arithmetic
      in bfloat16 XLA:CPU runs up to 20x slower at one row, and under --dtype auto for a bfloat16
      checkpoint or a quantized GGUF on a CPU with a bfloat16 dot instruction (AMX, or AVX512-BF16), where
      it streams half the bytes and multiplies several rows at twice float32's rate;
    - a GGUF file's own block format (q4_0, q4_1, q8_0), where its layers' matmul weights share one, under
      --dtype float32, and under auto without a bf16 dot: the native kernel multiplies the file's blocks in
      float32, which is exactly the float32 model the file holds, reading 4.5-8.5 bits a weight (faster
      than float32 weights at every batch);
    - None otherwise: --dtype float32 keeps every other checkpoint's weights in float32.
    (docs/perf-notes.md, "Sixteenth session" and "Twentieth session", has the figures.)"""
    if platform != "cpu":
        return None
    quantized_gguf = checkpoint.checkpoint_blocks is not None
    if quantized_gguf and (dtype == "float32" or (dtype == "auto" and not bf16_dots)):
        return checkpoint.checkpoint_blocks
    auto = dtype == "auto" and bf16_dots and checkpoint.torch_dtype == "bfloat16"  # a quantized GGUF's is too
    return "bf16" if dtype == "bfloat16" or auto else None


def kv_page_dtype(dtype: jnp.dtype, weight_quant: str | None, kv_format: str | None, platform: str) -> jnp.dtype:
    """The element type of plain (unquantized) KV pages: bfloat16 under bf16 weights (the CPU's bf16 mode of
    float32 activations over bfloat16 storage: a decode step then reads half the cache's bytes, and the same
    memory holds twice the pages), else the activations' dtype; on CPU a bfloat16 pool is stored as its bits
    (`kv_quant.BF16_BITS`, which says why). Quantized pages keep their own format."""
    dtype = jnp.dtype(jnp.bfloat16 if weight_quant == "bf16" else dtype)
    return BF16_BITS if kv_format is None and platform == "cpu" and dtype == jnp.bfloat16 else dtype


def check_weight_format(weight_quant: str | None, platform: str) -> None:
    """bf16 weights and GGUF blocks are the CPU's formats (float32 activations over bfloat16 weights or
    blocks, model/weight_quant.py); elsewhere a clear error."""
    if weight_quant == "bf16" and platform != "cpu":
        raise ValueError(f"--weight-quant bf16 keeps float32 activations over bfloat16 weights, on CPU; this is "
                         f"{platform} (serve --dtype bfloat16 instead)")
    if is_block_format(weight_quant) and platform != "cpu":
        raise ValueError(f"--weight-quant {weight_quant} multiplies GGUF blocks on CPU; this is {platform} (serve "
                         "int8 or fp8 instead)")


class CompilationCounter:
    """Counts XLA compilations, in all and per thread that triggered them (the listener runs on the thread
    that compiles), so an engine can prove none happen on its serving path after warm-up: its own thread's
    count, whatever else the process compiles (tests run engines and models side by side in one process).
    Those made on start-up's compile threads (`warmup`) are counted apart too."""

    _count = 0
    _startup_count = 0
    _by_thread: dict[int, int] = {}
    _installed = False
    _lock = threading.Lock()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # reported on the thread that compiled
            with cls._lock:
                cls._count += 1
                cls._startup_count += on_startup_thread()
                ident = threading.get_ident()
                cls._by_thread[ident] = cls._by_thread.get(ident, 0) + 1

    @classmethod
    def count(cls) -> int:
        """Every compilation so far."""
        return cls._count

    @classmethod
    def serving_count(cls) -> int:
        """Compilations off start-up's compile threads: once the engine serves, anything here is a bug."""
        return cls._count - cls._startup_count

    @classmethod
    def on_thread(cls, ident: int) -> int:
        """Compilations the thread of this `threading.get_ident()` triggered so far."""
        with cls._lock:
            return cls._by_thread.get(ident, 0)


class Engine:
    def __init__(
        self,
        model_config: ModelConfig,
        params: dict,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        model_path: str | None = None,
        mesh: Mesh | None = None,
    ):
        """An engine over parameters already placed on `mesh` (default: the first `tp` devices);
        `from_pretrained` is the usual way in."""
        self.model_path = model_path
        self.engine_config = config or EngineConfig()
        self.mesh = mesh or make_mesh(self.engine_config.tp)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.platform = jax.devices()[0].platform
        cache_dir = enable_compilation_cache(self.engine_config.compilation_cache_dir, self.platform)  # first
        self.dtype = resolve_dtype(self.engine_config.dtype, model_config, self.platform)
        self.kv_format = kv_format(self.engine_config.quant_policy)  # None: pages in `kv_dtype`
        self.kv_dtype = kv_page_dtype(self.dtype, model_config.weight_quant, self.kv_format, self.platform)
        self.ready = False
        self.compile_seconds = 0.0
        # time.monotonic() of the loop's last turn (an idle loop turns every half second): a server that
        # sees it stand still while it waits on the engine knows the engine is stuck (`EngineClient`).
        self.heartbeat = time.monotonic()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._thread_compile_base: tuple[int, int] | None = None  # (engine thread, its compilations then)
        self._stopping = threading.Event()
        self._sinks: dict[str, Callable[[EngineOutput], None]] = {}  # request id -> where its outputs go
        self._compilations_at_warmup = 0
        self._error: BaseException | None = None
        # `submit` and the thread's exit agree under this lock on whether the inbox is still read.
        self._inbox_lock = threading.Lock()
        self._accepting = False
        self._step_failures = 0
        self.fault_hook: Callable[[list[Chunk]], None] | None = None  # tests only; see the module docstring
        self.timeline: list[TurnRecord] | None = None  # see the module docstring
        self.on_startup: StartupListener | None = None  # hears of each bucket `start` compiles
        # Called on the engine thread after each loop turn has reported its outputs, and once more as
        # the thread ends: a consumer whose sinks only buffer wakes its reader once per step, not per token.
        self.step_listeners: list[Callable[[], None]] = []
        # Several hosts: the leader sends each step's plan to the followers before running it (`multihost`).
        self.plan: PlanBroadcaster | None = None

        self.buckets = self.engine_config.buckets(self.platform)
        # The buckets steps may use: all of them once compiled; while some still compile in the background
        # (`start(serve_early=True)`), those done so far. Set by the compile threads, read by the engine thread.
        self._usable_buckets = self.buckets
        self._compiler: BucketCompiler | None = None
        self._compiled_shapes: set = set()
        # Compiled buckets not run yet: the engine thread runs each once while it has nothing else to do
        # (`runner.warm`), so no request waits through a program's costlier first run.
        self._unwarmed: list[StepShape] = []
        self._compiled_lock = threading.Lock()
        self.max_batch_size = self.buckets.max_decode_batch
        page_size = self.engine_config.page_size
        session_len = self.engine_config.session_len or model_config.max_position_embeddings
        pages_per_seq = -(-session_len // page_size)
        self.num_pages = self._num_pages(pages_per_seq)
        # A lone sequence must always fit, or preemption could never make progress.
        self.max_session_len = min(session_len, (self.num_pages - 1) * page_size)
        self.page_size = page_size
        self.allocator = PageAllocator(self.num_pages)
        self.scheduler = Scheduler(self.allocator, self.buckets, page_size, self.max_batch_size, self.max_session_len,
                                   prefix_caching=self.engine_config.enable_prefix_caching)
        self.runner = ModelRunner(
            model_config, params, self.dtype, self.num_pages, page_size, pages_per_seq, self.buckets,
            num_slots=self.max_batch_size, mesh=self.mesh, attention_backend=self.engine_config.attention_backend,
            shared_prefix_attention=self.engine_config.enable_shared_prefix_attention,
            logprobs_mode=self.engine_config.logprobs_mode,
            guided_states=self.engine_config.guided_decoding_states, tokenizer=tokenizer, kv_format=self.kv_format,
            kv_dtype=self.kv_dtype, program_dir=cache_dir,
        )

    @classmethod
    def from_pretrained(cls, model_path: str | None = None, config: EngineConfig | None = None,
                        on_startup: StartupListener | None = None, tokenizer: Any = None) -> Engine:
        """Load a local Hugging Face checkpoint directory or GGUF file (None: the built-in demo model).
        `on_startup` hears of each tensor loaded, and later of each bucket `start` compiles
        (serving.engine.progress). `tokenizer`: the checkpoint's, if the caller has it (or one that loads
        on first use); None: loaded here."""
        if model_path is None:
            from configs.demo import ensure_demo_checkpoint

            model_path = ensure_demo_checkpoint()
        if not (os.path.isdir(model_path) or os.path.isfile(model_path)):
            raise FileNotFoundError(
                f"model path {model_path!r} is not a local directory or GGUF file (a hub id is downloaded by "
                "model.source.resolve_model first)"
            )
        config = config or EngineConfig()
        group = resolve_group(config.nnodes, config.node_rank, config.dist_init_addr, config.dist_timeout,
                              config.dist_init_timeout)
        if group is not None:
            join(group)  # before anything touches JAX: the devices of every host then make one mesh
        # Start-up's timeline at --log-level INFO (tools/bench_startup keeps each line's time).
        began = time.monotonic()
        devices = jax.devices()
        logger.info("%d %s devices up in %.1fs", len(devices), devices[0].device_kind, time.monotonic() - began)
        # Before the weights: their loading and random initialisation compile programs too.
        enable_compilation_cache(config.compilation_cache_dir, devices[0].platform)
        checkpoint = ModelConfig.from_pretrained(model_path)
        weight_quant = config.weight_quant or checkpoint.weight_quant or default_weight_format(
            config.dtype, checkpoint, devices[0].platform, cpu_has_bf16_dots())
        model_config = with_weight_quant(checkpoint, weight_quant, config.lm_head_quant)
        if tokenizer is None:
            tokenizer = load_tokenizer(model_path)
        dtype = resolve_dtype(config.dtype, model_config, devices[0].platform)
        check_weight_format(model_config.weight_quant, devices[0].platform)
        mesh = make_mesh(config.tp)
        began = time.monotonic()
        if config.load_format == "dummy":
            logger.warning("load_format=dummy: serving RANDOM weights at %s's shapes (benchmarks only)", model_path)
            params = init_random_params(model_config, dtype, config.seed, mesh)
        else:
            params = load_params(model_path, model_config, dtype, mesh, on_loaded=weights_reporter(on_startup))
        jax.block_until_ready(params)
        logger.info("weights on the devices in %.1fs", time.monotonic() - began)
        began = time.monotonic()
        engine = cls(model_config, params, tokenizer, config, model_path=model_path, mesh=mesh)
        logger.info("engine built in %.1fs: %d KV pages, the runner's tables", time.monotonic() - began,
                    engine.num_pages)
        engine.on_startup = on_startup
        if group is not None and group.is_leader:
            engine.plan = PlanBroadcaster(group)  # listening already: followers may connect while it compiles
            engine.plan.on_lost = engine._lose_follower
        return engine

    # ----- set-up -----------------------------------------------------------------------------------
    def _num_pages(self, pages_per_seq: int) -> int:
        cfg = self.engine_config
        if cfg.num_pages is not None:
            return cfg.num_pages
        # Per device: tensor parallelism splits every page by KV head.
        # Quantized pages (--quant-policy) take fewer bytes: the same budget holds more of them.
        page_bytes = kv_bytes_per_token(self.model_config, self.kv_dtype, self.kv_format) * cfg.page_size // cfg.tp
        if self.platform == "cpu":
            budget = CPU_KV_CACHE_BYTES * cfg.cache_max_entry_count
        else:
            stats = jax.devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            budget = free * cfg.cache_max_entry_count
        useful = self.max_batch_size * pages_per_seq + 1  # more could never be used at once
        pages = min(int(budget // page_bytes), useful)
        if jax.process_count() > 1:  # every host must build the same cache: the smallest one's
            from jax.experimental import multihost_utils

            pages = int(multihost_utils.process_allgather(np.int64(pages)).min())
        if pages < 2:
            raise MemoryError(f"KV cache budget of {budget / 2**20:.0f} MiB holds fewer than 2 pages")
        return pages

    def start(self, serve_early: bool = False) -> None:
        """Compile the buckets, then start the engine thread; returns when the engine serves.

        serve_early: serve once the essential buckets are compiled (`BucketSet.essential_shapes`), while the
        others compile in the background and the scheduler takes each as it becomes ready; otherwise (and
        for a leader of several hosts, whose followers compile everything first) once every bucket is."""
        self._compile_buckets(early=serve_early and self.plan is None)
        if self.plan is not None:
            self.plan.accept()
        self._thread = threading.Thread(target=self._loop, name="xlserve-engine", daemon=True)
        self.heartbeat = time.monotonic()
        self._accepting = True
        self._thread.start()
        self.ready = True

    def warm_up(self) -> None:
        """Compile every bucket (blocking); compilations from here on count as after warm-up."""
        self._compile_buckets(early=False)

    def begin_compiling(self) -> None:
        """Start compiling every bucket on `warmup`'s threads and return at once (again: nothing). An engine in
        a process of its own begins as soon as it is built, while the server's process still loads its
        tokenizer and HTTP stack; `start` then waits only for what is left."""
        if self._compiler is not None:
            return
        CompilationCounter.install()
        self._compiler = BucketCompiler(self.runner.startup_units(), essential=len(self.buckets.essential_shapes()),
                                        on_done=self._bucket_compiled)
        # Until every bucket is compiled, steps choose among those that are (`_bucket_compiled` widens it).
        self._usable_buckets = self.buckets.with_compiled(frozenset())
        self._compiler.start()

    def _compile_buckets(self, early: bool) -> None:
        """Compile on `warmup`'s threads until the essential buckets (early) or all of them are done."""
        self.begin_compiling()
        self._compiler.wait(essential_only=early)
        self.compile_seconds = self._compiler.seconds
        self._compilations_at_warmup = CompilationCounter.serving_count()

    def _bucket_compiled(self, unit: CompileUnit, done: int, total: int, seconds: float) -> None:
        """A compile thread's news: `unit`'s programs are compiled, so steps may now use its bucket."""
        with self._compiled_lock:
            if unit.shape is not None:
                self._compiled_shapes.add(unit.shape)
                self._unwarmed.append(unit.shape)
            every = self._compiled_shapes >= set(self.buckets.shapes())
            self._usable_buckets = self.buckets.with_compiled(None if every else frozenset(self._compiled_shapes))
        if self._compiler is not None and self._compiler.remaining == 0:
            self.compile_seconds = self._compiler.seconds
            logger.info("compiled %d buckets' programs in %.1fs", total, self.compile_seconds)
        reporter = buckets_reporter(self.on_startup)
        if reporter is not None:
            reporter(done, total, unit.label, seconds)

    @property
    def buckets_remaining(self) -> int:
        """Units of start-up compilation not done yet (`warmup.CompileUnit`): all of them before `start`, 0 once
        everything is compiled."""
        return self._compiler.remaining if self._compiler is not None else len(self.runner.startup_units())

    @property
    def buckets_unrun(self) -> int:
        """Compiled buckets not run yet (`runner.warm`): the engine runs each once while idle."""
        with self._compiled_lock:
            return len(self._unwarmed)

    def shutdown(self) -> None:
        self.ready = False
        if self._compiler is not None:
            self._compiler.cancel()  # buckets still compiling in the background would only cost CPU now
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.plan is not None:
            self.plan.close()

    def _lose_follower(self, why: str) -> None:
        """A follower is gone: the group cannot run another step (its collectives would wait forever), so
        fail the probes now and end the process shortly (`multihost.exit_after_grace`)."""
        self._error = PeerLost(why)
        self.ready = False
        with self._inbox_lock:
            self._accepting = False
        exit_after_grace(why)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @functools.cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """The stop ids of every request: config.json's and the tokenizer's (read on first use, so an engine
        given a tokenizer that loads on demand, as the engine process's, never loads it for this)."""
        return stop_ids(self.model_config, self.tokenizer)

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name

    @property
    def quantization_name(self) -> str:
        """What is stored quantized, for the start-up line: "int8 weights, int4 KV" (empty: nothing)."""
        parts = [f"{self.model_config.weight_quant} weights"] if self.model_config.weight_quant else []
        kv = self.kv_format or ("bf16" if self.kv_dtype == BF16_BITS else None)
        return ", ".join(parts + ([f"{kv} KV"] if kv else []))

    @property
    def error(self) -> BaseException | None:
        """Why the engine thread ended, if it failed."""
        return self._error

    # ----- the caller's side (any thread) -------------------------------------------------------------
    def make_request(self, prompt_token_ids: list[int], config: GenerationConfig, request_id: str,
                     session_id: str | None = None) -> EngineRequest:
        """Validate a request and fill in its stop ids and seed (`request.build_request`); raises
        InvalidRequestError. With a `session_id`, the request is a turn of that interactive session:
        its KV pages stay pinned under the id when it finishes, for the next turn to reuse (`end_session`)."""
        return build_request(prompt_token_ids, config, request_id, session_id, vocab_size=self.model_config.vocab_size,
                             eos_token_ids=self.eos_token_ids, max_session_len=self.max_session_len)

    def start_profile(self, directory: str) -> None:
        """Start a JAX profiler trace of this process (the engine's host work and device kernels)."""
        options = jax.profiler.ProfileOptions()
        # Tracing every Python call slows the host loop several-fold, so a trace of a loaded server would
        # show a host-bound engine that is not (docs/perf-notes.md). Dispatches and transfers still show,
        # from JAX's own host annotations.
        options.python_tracer_level = 0
        jax.profiler.start_trace(directory, create_perfetto_trace=True, profiler_options=options)

    def stop_profile(self) -> None:
        """Stop the trace and write it under the directory `start_profile` was given."""
        jax.profiler.stop_trace()

    def submit(self, request: EngineRequest, sink: Callable[[EngineOutput], None]) -> None:
        with self._inbox_lock:
            if not self._accepting or self._stopping.is_set():
                raise RuntimeError("the engine is not running")
            self._inbox.put(("add", request, sink))

    def abort(self, request_id: str) -> None:
        if self._accepting:  # an engine that has stopped holds nothing to abort
            self._inbox.put(("abort", request_id, None))

    def end_session(self, session_id: str) -> None:
        """Unpin an interactive session's pages (they stay cached until evicted)."""
        if self._accepting:
            self._inbox.put(("end_session", session_id, None))

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_pages_total=self.allocator.num_usable,
            num_pages_used=self.allocator.num_used,
            num_cached_pages=self.allocator.num_cached,
            num_pinned_sessions=len(self.scheduler.kv.pins),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hits=self.scheduler.num_reused_tokens,
            prompt_tokens_computed=self.scheduler.num_prompt_tokens_computed,
            shared_prefix_steps=self.runner.shared_prefix_steps,
            shared_prefix_rows=self.runner.shared_prefix_rows,
            mixed_steps=self.runner.mixed_steps,
            compilations_after_warmup=self._compilations_after_warmup(),
            startup_buckets_remaining=self.buckets_remaining,
            startup_buckets_unrun=self.buckets_unrun,
        )

    def _compilations_after_warmup(self) -> int:
        """The engine thread's compilations (its steps are the serving path); an engine stepped by its
        caller instead, after `warm_up`, counts every compilation in the process since then."""
        if self._thread_compile_base is not None:
            ident, base = self._thread_compile_base
            return CompilationCounter.on_thread(ident) - base
        return CompilationCounter.serving_count() - self._compilations_at_warmup

    # ----- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        # The step dispatched last turn, whose tokens are read only after this turn's dispatch: the
        # device always has the next step queued while the host reads, detokenizes and schedules.
        in_flight: list[tuple[list[Chunk], StepOutput]] = []
        warming = False  # a warm-up step ran last turn: the next one follows without another idle wait
        ident = threading.get_ident()  # an id may be a finished thread's: count from what it had
        self._thread_compile_base = (ident, CompilationCounter.on_thread(ident))
        try:
            while not self._stopping.is_set():
                idle = not self.scheduler.has_work and not in_flight
                taken = self._take_inbox(block=idle and not warming)
                if self._stopping.is_set():
                    break
                # Warm only after a whole idle wait (0.5 s) brought nothing, so a burst of requests never
                # waits behind a warm-up step, then bucket after bucket while nothing comes (one idle wait
                # each left a fresh server's first requests paying first runs, docs/perf-notes.md
                # "Eighteenth session"); a group of hosts runs no step its followers were not sent.
                warming = idle and not taken and self.plan is None and bool(self._unwarmed)
                if warming:
                    self._warm_next()
                    continue
                timeline, start = self.timeline, time.perf_counter()  # read once: another thread may set it
                self.scheduler.buckets = self._usable_buckets  # buckets compiled since the last turn join in
                plan = self.scheduler.schedule()
                dispatched = self._dispatch_or_fail(plan.decode, plan.prefill)
                queued = time.perf_counter()
                if timeline is not None:
                    _wait_quietly(in_flight)
                ready = time.perf_counter()
                self._read_back_or_fail(in_flight)
                if timeline is not None:
                    timeline.append(TurnRecord(start, queued, ready, time.perf_counter(), len(plan.decode),
                                               sum(c.length for c in plan.prefill)))
                in_flight = dispatched
                self._end_step()
        except BaseException as exc:  # the engine must never hang silently: fail every request
            logger.exception("engine thread crashed")
            self._error = exc
            self.ready = False
            for output in self.scheduler.abort_all(FinishReason.ERROR, error=f"engine failure: {exc}"):
                self._emit(output)
        finally:
            with self._inbox_lock:
                self._accepting = False
            for output in self.scheduler.abort_all(FinishReason.ABORT):
                self._emit(output)
            self._refuse_inbox()
            self._end_step()

    def _warm_next(self) -> None:
        with self._compiled_lock:
            shape = self._unwarmed.pop(0)
        self.runner.warm(shape)
        self.heartbeat = time.monotonic()

    def _end_step(self) -> None:
        self.heartbeat = time.monotonic()
        for listener in tuple(self.step_listeners):  # a copy: another thread may add one meanwhile
            try:
                listener()
            except Exception:  # a broken consumer must not take the engine down with it
                logger.exception("a step listener failed")

    def _refuse_inbox(self) -> None:
        """Answer requests submitted but never taken in, so no caller waits forever."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[0] == "add":
                _, request, sink = item
                error = f"engine failure: {self._error}" if self._error is not None else None
                try:
                    sink(EngineOutput(request_id=request.request_id, finished=True,
                                      finish_reason=FinishReason.ERROR if error else FinishReason.ABORT,
                                      num_prompt_tokens=len(request.prompt_token_ids), error=error))
                except Exception:
                    logger.exception("sink of request %s failed", request.request_id)

    def _take_inbox(self, block: bool) -> bool:
        """Take in what callers submitted (waiting up to 0.5 s for something if `block`); False if nothing was."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while item is not None:
            kind, payload, sink = item
            if kind == "add":
                self._sinks[payload.request_id] = sink
                self._emit(self.scheduler.add_request(payload))
            elif kind == "end_session":
                self.scheduler.end_session(payload)
            else:
                self._emit(self.scheduler.abort(payload))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
        return True

    def _dispatch_or_fail(self, decode: list[Chunk], prefill: list[Chunk]) -> list[tuple[list[Chunk], StepOutput]]:
        """Queue the plan's steps on the device without waiting for them, each on its own, so a failure fails
        only its step's requests."""
        dispatched = []
        for chunks, shape in self._steps(decode, prefill):
            try:
                if self.fault_hook is not None:
                    self.fault_hook(chunks)
                dispatched.append((chunks, self._run(chunks, shape)))
            except Exception as exc:
                self._fail_step(chunks, exc)
        return dispatched

    def _steps(self, decode: list[Chunk], prefill: list[Chunk]) -> list[tuple[list[Chunk], StepShape]]:
        """The plan as steps: one mixed step when a compiled bucket holds both its decoding rows and its prompt
        chunks (the decoding rows first: `runner.unpack_step`), else a decode step and a prefill step."""
        buckets = self.scheduler.buckets  # what the plan was made with: only compiled buckets
        prompt = (len(prefill), max((c.length for c in prefill), default=0), sum(c.length for c in prefill))
        mixed = buckets.mixed_bucket(len(decode), *prompt) if decode and prefill else None
        if mixed is not None:
            return [(decode + prefill, mixed)]
        steps = []
        if decode:
            rows = buckets.decode_bucket(len(decode))
            steps.append((decode, StepShape(rows, 1, rows)))
        if prefill:
            shape = buckets.prefill_bucket(*prompt)
            assert shape is not None, "the scheduler only plans chunks that fit a bucket"
            steps.append((prefill, shape))
        return steps

    def _read_back_or_fail(self, dispatched: list[tuple[list[Chunk], StepOutput]]) -> None:
        for batch in dispatched:
            try:
                self._read_back([batch])
            except Exception as exc:
                self._fail_step(batch[0], exc)
            else:
                self._step_failures = 0

    def _fail_step(self, chunks: list[Chunk], exc: Exception) -> None:
        """Fail the requests of a step that raised, or give up if steps keep failing."""
        self._step_failures += 1
        if self._step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise RuntimeError(f"{self._step_failures} steps failed in a row; the last: {exc!r}") from exc
        logger.exception("a step failed; failing its %d requests", len(chunks))
        for request_id in dict.fromkeys(c.request_id for c in chunks):
            self._emit(self.scheduler.abort(request_id, FinishReason.ERROR,
                                            error=f"the step running this request failed: {exc!r}"))

    def _run(self, chunks: list[Chunk], shape: StepShape) -> StepOutput:
        if self.plan is not None:
            self.plan.send_step(chunks, *shape)
        return self.runner.run(chunks, *shape)

    def _read_back(self, dispatched: list[tuple[list[Chunk], StepOutput]]) -> None:
        """Read a dispatched step's tokens and report what they did to each sequence."""
        for chunks, step in dispatched:
            logprobs = jax.device_get(step.logprobs) if step.logprobs is not None else None
            hidden = np.asarray(step.hidden) if step.hidden is not None else None
            tokens = np.asarray(step.tokens).tolist()
            produced_at = time.monotonic()
            self.runner.guided.observe(chunks, tokens)
            for output in self.scheduler.update_from_output(chunks, tokens, logprobs, produced_at, hidden):
                self._emit(output)

    def _emit(self, output: EngineOutput | None) -> None:
        if output is None:
            return
        sink = self._sinks.pop(output.request_id, None) if output.finished else self._sinks.get(output.request_id)
        if sink is None:
            return
        try:
            sink(output)
        except Exception:  # a broken consumer must not take the engine down with it
            logger.exception("sink of request %s failed", output.request_id)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no request is running or waiting (tests use it to check nothing leaked)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.scheduler.has_work and self._inbox.empty():
                return True
            time.sleep(0.01)
        return False
