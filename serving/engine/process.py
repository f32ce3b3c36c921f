"""The engine in a process of its own (`EngineProcess`), behind the calls the HTTP layer makes on `Engine`.

Why: in one process the server's event loop (SSE chunks, detokenization, socket writes) and the engine
thread share one GIL, and under many streams the engine's turns stretch (docs/perf-notes.md, "B2:
packed prefill and the engine process"). As vLLM's v1 engine core does, the server then runs the engine
in a child process that owns the accelerator, and keeps the tokenizer, request validation and HTTP for
itself.

The child is spawned (JAX is not fork-safe) and builds the engine with `Engine.from_pretrained`. Two
pipes join the processes. Commands go down: add, abort, end a session, profile, start, shutdown.
Events come up: start-up progress (serving.engine.progress), the engine's facts once it is built, ready
or failed, and per engine step one message with every output of the step and the engine's `EngineStats`
after it. The parent's reader thread hands
each output to its request's sink and then calls the step listeners, so an HTTP handler sees what an
in-process engine would show it. The parent never initialises a JAX backend, so the child gets the
whole accelerator.

Nothing the server asks of the engine waits for the child: `stats()` is the last report (an idle engine
reports at least every `HEARTBEAT_S`, so `heartbeat` also tells a wedged child from an idle one), and
commands go down the pipe from a writer thread of their own, so a stopped child whose pipe has filled
up blocks that thread, never the caller (the server's event loop). Only profiling is a question; its
answer carries the question's number, so an answer that comes after its question timed out is dropped
rather than taken for the next question's.

If the child dies (a crash, a kill), the reader fails every request still waiting with an ERROR
output, `alive` turns false, `submit` refuses new work and `abort`/`end_session` do nothing, as for an
in-process engine whose thread ended.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from model.config import ModelConfig
from serving.engine.checkpoint_text import load_tokenizer, stop_ids
from serving.engine.client import EngineStats
from serving.engine.config import EngineConfig
from serving.engine.progress import StartupEvent, StartupListener
from serving.request import EngineOutput, EngineRequest, FinishReason, GenerationConfig, build_request

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0  # profile answers; the child answers between its own commands
# A healthy child ends within a second of being told to; one that does not (a wedged device) is killed.
SHUTDOWN_TIMEOUT_S = 10.0
# The child reports at least this often, even with nothing to report: its silence means it is stuck.
HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class EngineFacts:
    """What the server needs to know of an engine the child built (the sizes depend on device memory)."""

    max_session_len: int
    max_batch_size: int
    page_size: int
    dtype_name: str
    quantization_name: str


class EngineProcess:
    """`Engine`'s server-facing calls, served by an engine in a child process."""

    def __init__(self, model_path: str, config: EngineConfig, log_level: int | str = logging.WARNING,
                 on_startup: StartupListener | None = None):
        """`on_startup` hears of the child's start-up progress, on this thread while the weights load and
        on the reader thread while the buckets compile (serving.engine.progress)."""
        self.model_path = model_path
        self.on_startup = on_startup
        self.engine_config = config
        self.step_listeners: list[Callable[[], None]] = []
        self.ready = False
        self.compile_seconds = 0.0
        self.heartbeat = time.monotonic()  # when the child last reported (`EngineClient.heartbeat`)
        context = multiprocessing.get_context("spawn")
        child_commands, self._commands = context.Pipe(duplex=False)
        self._events, child_events = context.Pipe(duplex=False)
        self._process = context.Process(target=run_engine_process, name="xlserve-engine",
                                        args=(model_path, config, child_commands, child_events, log_level), daemon=True)
        self._process.start()
        child_commands.close()  # the child's ends: once it exits, reads here see EOF instead of hanging
        child_events.close()
        try:  # while the child starts: its imports and weights take seconds, this a second or two more
            self.model_config = ModelConfig.from_pretrained(model_path)
            self.tokenizer = load_tokenizer(model_path)  # transformers: only once the child is on its way
            # As `Engine.eos_token_ids`: the child, which loads its tokenizer only on demand, never reads it.
            self.eos_token_ids = stop_ids(self.model_config, self.tokenizer)
        except BaseException:
            self._process.kill()
            self._process.join(timeout=SHUTDOWN_TIMEOUT_S)
            raise
        # `submit` and the reader's refusal of new work when the child ends agree under this lock.
        self._submit_lock = threading.Lock()
        # request key -> (request, sink); keys, not request ids, so equal ids from callers never mix
        self._sinks: dict[int, tuple[EngineRequest, Callable[[EngineOutput], None]]] = {}
        self._keys = itertools.count()
        self._accepting = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # commands for the writer thread; None ends it
        self._replies: queue.SimpleQueue = queue.SimpleQueue()  # (question number, answer)
        self._reply_lock = threading.Lock()
        self._questions = itertools.count()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        kind, payload = self._receive()  # the child loads the weights: as long as an in-process load
        while kind == "progress":
            self._report(payload)
            kind, payload = self._receive()
        if kind != "built":
            self._process.join(timeout=SHUTDOWN_TIMEOUT_S)
            raise payload
        facts: EngineFacts
        facts, self._stats_fields = payload
        self._last_stats = EngineStats(*self._stats_fields)
        self.max_session_len = facts.max_session_len
        self.max_batch_size = facts.max_batch_size
        self.page_size = facts.page_size
        self.dtype_name = facts.dtype_name
        self.quantization_name = facts.quantization_name
        self._reader = threading.Thread(target=self._read_events, name="xlserve-engine-events", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write_commands, name="xlserve-engine-commands", daemon=True)
        self._writer.start()

    @classmethod
    def from_pretrained(cls, model_path: str | None = None, config: EngineConfig | None = None,
                        log_level: int | str = logging.WARNING,
                        on_startup: StartupListener | None = None) -> EngineProcess:
        """As `Engine.from_pretrained`, with the engine in a child process (None: the built-in demo model)."""
        if model_path is None:
            from configs.demo import ensure_demo_checkpoint

            model_path = ensure_demo_checkpoint()
        return cls(model_path, config or EngineConfig(), log_level, on_startup)

    # ----- life cycle ------------------------------------------------------------------------------
    def start(self, serve_early: bool = False) -> None:
        """Compile in the child and wait until it serves (`Engine.start`); raises what the child's start raised."""
        self._outbox.put(("start", serve_early))
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        self._accepting = True
        self.ready = True

    def shutdown(self) -> None:
        """Stop the engine (requests still running end with ABORT) and the child; a child that does not
        end within `SHUTDOWN_TIMEOUT_S` is killed (its requests then end with ERROR)."""
        self.ready = False
        self._outbox.put(("shutdown",))
        self._outbox.put(None)
        self._process.join(timeout=SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0fs; killing it", SHUTDOWN_TIMEOUT_S)
            self._process.kill()
            self._process.join(timeout=SHUTDOWN_TIMEOUT_S)
        self._reader.join(timeout=SHUTDOWN_TIMEOUT_S)  # the pipe is closed now: it has only the rest to read

    @property
    def alive(self) -> bool:
        return self._reader.is_alive() and self._process.is_alive()

    # ----- the caller's side (any thread) -----------------------------------------------------------
    def make_request(self, prompt_token_ids: list[int], config: GenerationConfig, request_id: str,
                     session_id: str | None = None) -> EngineRequest:
        """As `Engine.make_request`: validated here, so a bad request never reaches the child."""
        return build_request(prompt_token_ids, config, request_id, session_id, vocab_size=self.model_config.vocab_size,
                             eos_token_ids=self.eos_token_ids, max_session_len=self.max_session_len)

    def submit(self, request: EngineRequest, sink: Callable[[EngineOutput], None]) -> None:
        with self._submit_lock:
            if not self._accepting:
                raise RuntimeError("the engine is not running")
            key = next(self._keys)
            self._sinks[key] = (request, sink)
            self._outbox.put(("add", key, request))

    def abort(self, request_id: str) -> None:
        if self.alive:  # a dead child holds nothing to abort
            self._outbox.put(("abort", request_id))

    def end_session(self, session_id: str) -> None:
        if self.alive:
            self._outbox.put(("end_session", session_id))

    def stats(self) -> EngineStats:
        """The child engine's `Engine.stats()` as of its last report (one engine step old at most, or
        `HEARTBEAT_S` when idle); its last one once the child has gone. Never waits for the child."""
        return self._last_stats

    def start_profile(self, directory: str) -> None:
        self._ask("start_profile", directory)

    def stop_profile(self) -> None:
        self._ask("stop_profile")

    def _ask(self, question: str, *args: Any) -> Any:
        """Ask the child and wait for its answer (raised if it is an exception)."""
        with self._reply_lock:  # one question at a time
            number = next(self._questions)
            self._outbox.put((question, number, *args))
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while True:
                try:
                    answered, answer = self._replies.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    raise RuntimeError(f"the engine process did not answer {question!r}") from None
                if answered in (number, None):  # None: the child has ended
                    break
                # The late answer to an earlier question that timed out: nobody waits for it any more.
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._events.recv()
        except (EOFError, OSError):
            self._process.join(timeout=1)  # it has closed its pipe: it is ending, let its exit code show
            return "exit", RuntimeError(f"the engine process ended (exit code {self._process.exitcode})")

    # ----- the writer thread -----------------------------------------------------------------------
    def _write_commands(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._commands.send(command)
            except (OSError, ValueError):  # the child has gone: what is left to say concerns nobody
                return

    # ----- the reader thread -----------------------------------------------------------------------
    def _read_events(self) -> None:
        error: BaseException | None = None
        while True:
            kind, payload = self._receive()
            if kind == "outputs":
                outputs, stats = payload
                self.heartbeat = time.monotonic()
                if stats != self._stats_fields:  # first, so a caller woken by an output sees its effect
                    self._stats_fields, self._last_stats = stats, EngineStats(*stats)
                self._deliver(outputs)
            elif kind == "progress":
                self._report(payload)
            elif kind == "ready":
                self.compile_seconds = payload
                self.heartbeat = time.monotonic()  # serving starts now, not when the compile began
                self._started.set()
            elif kind == "failed":
                self._start_error = payload
                self._started.set()
            elif kind == "reply":
                self._replies.put(payload)
            elif kind == "exit":
                error = payload
                break
        with self._submit_lock:
            self._accepting = False
        self.ready = False
        if error is not None and self._started.is_set():
            logger.error("%s; failing its %d requests", error, len(self._sinks))
        if not self._started.is_set():  # the child ended while compiling
            self._start_error = error or RuntimeError("the engine process ended before it was ready")
            self._started.set()
        self._replies.put((None, RuntimeError("the engine process has ended")))  # a question asked just now
        # Whatever still waits gets an answer: ERROR if the child failed, ABORT if it was shut down.
        reason = FinishReason.ERROR if error is not None else FinishReason.ABORT
        message = f"engine failure: {error}" if error is not None else None
        for request, sink in self._sinks.values():
            _call(sink, EngineOutput(request_id=request.request_id, finished=True, finish_reason=reason,
                                     num_prompt_tokens=len(request.prompt_token_ids), error=message))
        self._sinks.clear()
        self._notify()

    def _deliver(self, outputs: list[tuple]) -> None:
        for key, *fields in outputs:  # `_compact`'s tuples
            output = EngineOutput(*fields)
            entry = self._sinks.pop(key) if output.finished else self._sinks.get(key)
            if entry is not None:
                _call(entry[1], output)
        self._notify()

    def _report(self, event: StartupEvent) -> None:
        if self.on_startup is not None:
            try:
                self.on_startup(event)
            except Exception:  # a broken display must not stop the start
                logger.exception("the start-up listener failed")

    def _notify(self) -> None:
        for listener in tuple(self.step_listeners):
            try:
                listener()
            except Exception:  # a broken consumer must not take the reader down with it
                logger.exception("a step listener failed")


def _call(sink: Callable[[EngineOutput], None], output: EngineOutput) -> None:
    try:
        sink(output)
    except Exception:  # as the engine does: a broken consumer must not stop the others' outputs
        logger.exception("sink of request %s failed", output.request_id)


# ----- the child ------------------------------------------------------------------------------------
def run_engine_process(model_path: str, config: EngineConfig, commands: Connection, events: Connection,
                       log_level: int | str) -> None:
    """The child's main: build the engine, report its facts, start it when told, then serve commands."""
    # The server process decides when the engine stops, after its drain: a Ctrl-C sent to the whole
    # process group must not end the engine under the requests being drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    from serving.engine.engine import Engine  # the device is claimed here, in the child only

    send_lock = threading.Lock()

    def send(message: tuple) -> None:  # the engine thread, the start thread and the command loop all send
        with send_lock:
            events.send(message)

    try:
        engine = Engine.from_pretrained(model_path, config, on_startup=lambda event: send(("progress", event)),
                                        tokenizer=TokenizerOnDemand(model_path))
    except BaseException as error:
        send(("failed", _portable(error)))
        return
    facts = EngineFacts(engine.max_session_len, engine.max_batch_size, engine.page_size, engine.dtype_name,
                        engine.quantization_name)
    send(("built", (facts, _stats_fields(engine))))
    engine.begin_compiling()  # while the server's process builds its app; its "start" waits for the rest
    report = _StepReport(engine, send)
    engine.step_listeners.append(report)
    try:
        _serve_commands(engine, commands, send, report.outputs)
    finally:
        engine.shutdown()
        report()  # the ABORT outputs of whatever was still running
        send(("exit", None if engine.error is None else _portable(engine.error)))
    # No interpreter teardown: freeing XLA's client and executables one by one took 4 s on CPU, which a
    # shutting-down server would wait for; the system frees the process's memory (and device) at once.
    logging.shutdown()
    os._exit(0)


class TokenizerOnDemand:
    """The checkpoint's `Tokenizer`, loaded on first use. The engine process needs one only for grammars
    matched on the host (llguidance), and loading it (transformers, which imports torch) took 2-4 s of CPU
    at every start; the server process has its own for everything else."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.model_path)
        return getattr(self._tokenizer, name)


def _stats_fields(engine: Any) -> tuple:
    """`engine.stats()` as a plain tuple (`EngineStats(*fields)` rebuilds it): it pickles faster."""
    return tuple(vars(engine.stats()).values())


class _StepReport:
    """The engine's step listener in the child: one message per step, with the step's outputs and the
    engine's stats after it; a step with neither (an idle turn) reports only every `HEARTBEAT_S`."""

    def __init__(self, engine: Any, send: Callable[[tuple], None]):
        self.engine = engine
        self.send = send
        self.outputs: list[tuple] = []  # `_compact` outputs, appended and sent on the engine thread only
        self._stats: tuple = ()
        self._sent = 0.0

    def __call__(self) -> None:
        stats = _stats_fields(self.engine)
        now = time.monotonic()
        if self.outputs or stats != self._stats or now - self._sent >= HEARTBEAT_S:
            batch = self.outputs.copy()
            self.outputs.clear()
            self._stats, self._sent = stats, now
            self.send(("outputs", (batch, stats)))


def _serve_commands(engine: Any, commands: Connection, send: Callable[[tuple], None],
                    step_outputs: list[tuple]) -> None:
    started = threading.Event()  # the engine thread runs: from now on, its end ends the child

    def start(serve_early: bool) -> None:  # off the command loop, so stats are answered while the buckets compile
        try:
            engine.start(serve_early)
        except BaseException as error:
            send(("failed", _portable(error)))
            return
        started.set()
        send(("ready", engine.compile_seconds))

    while True:
        if started.is_set() and not engine.alive:  # the engine thread ended (a crash): so does the child
            return
        if not commands.poll(0.5):
            continue
        try:
            command, *args = commands.recv()
        except (EOFError, OSError):  # the server process is gone
            return
        if command == "add":
            key, request = args
            try:
                engine.submit(request, lambda output, key=key: step_outputs.append(_compact(key, output)))
            except RuntimeError as error:  # the engine thread just ended: answer this one request here
                failed = EngineOutput(request.request_id, finished=True, finish_reason=FinishReason.ERROR,
                                      error=str(error))
                send(("outputs", ([_compact(key, failed)], _stats_fields(engine))))
        elif command == "abort":
            engine.abort(*args)
        elif command == "end_session":
            engine.end_session(*args)
        elif command == "start":
            threading.Thread(target=start, args=args, name="xlserve-engine-start", daemon=True).start()
        elif command == "shutdown":
            return
        else:  # questions: start_profile, stop_profile, with the question's number first
            number, *args = args
            try:
                send(("reply", (number, getattr(engine, command)(*args))))
            except Exception as error:
                send(("reply", (number, _portable(error))))


def _compact(key: int, output: EngineOutput) -> tuple:
    """`(key, *fields)`: a step's 512 outputs pickle in 0.17 ms as tuples, 0.61 ms as dataclasses, and
    the pickling runs on the engine thread."""
    return key, *vars(output).values()


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling to the server process, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
