"""The engine in a process of its own (`EngineProcess`), behind the calls the HTTP layer makes on `Engine`.

Why: in one process the server's event loop (SSE chunks, detokenization, socket writes) and the engine
thread share one GIL, and under many streams the engine's turns stretch (docs/perf-notes.md, "B2:
packed prefill and the engine process"). As vLLM's v1 engine core does, the server then runs the engine
in a child process that owns the accelerator, and keeps the tokenizer, request validation and HTTP for
itself.

The child is spawned (JAX is not fork-safe) and builds the engine with `Engine.from_pretrained`. Two
pipes join the processes. Commands go down: add, abort, end a session, stats, profile, start, shutdown.
Events come up: start-up progress (serving.engine.progress), the engine's facts once it is built, ready
or failed, and per engine step one message with every output of the step. The parent's reader thread
hands each output to its request's sink and then calls the step listeners, so an HTTP handler sees what
an in-process engine would show it. The parent never initialises a JAX backend, so the child gets the
whole accelerator.

If the child dies (a crash, a kill), the reader fails every request still waiting with an ERROR
output, `alive` turns false and `submit` refuses new work, as an in-process engine whose thread ended.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from model.config import ModelConfig
from serving.engine.client import EngineStats
from serving.engine.config import EngineConfig
from serving.engine.progress import StartupEvent, StartupListener
from serving.request import EngineOutput, EngineRequest, FinishReason, GenerationConfig, build_request
from serving.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0  # stats and profile answers; the child answers between its own commands
SHUTDOWN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class EngineFacts:
    """What the server needs to know of an engine the child built (the sizes depend on device memory)."""

    eos_token_ids: frozenset[int]
    max_session_len: int
    max_batch_size: int
    page_size: int
    dtype_name: str


class EngineProcess:
    """`Engine`'s server-facing calls, served by an engine in a child process."""

    def __init__(self, model_path: str, config: EngineConfig, log_level: int | str = logging.WARNING,
                 on_startup: StartupListener | None = None):
        """`on_startup` hears of the child's start-up progress, on this thread while the weights load and
        on the reader thread while the buckets compile (serving.engine.progress)."""
        self.model_path = model_path
        self.on_startup = on_startup
        self.engine_config = config
        self.model_config = ModelConfig.from_pretrained(model_path)
        self.tokenizer = Tokenizer.from_pretrained(model_path)
        self.step_listeners: list[Callable[[], None]] = []
        self.ready = False
        self.compile_seconds = 0.0
        context = multiprocessing.get_context("spawn")
        child_commands, self._commands = context.Pipe(duplex=False)
        self._events, child_events = context.Pipe(duplex=False)
        self._process = context.Process(target=run_engine_process, name="xlserve-engine",
                                        args=(model_path, config, child_commands, child_events, log_level), daemon=True)
        self._process.start()
        child_commands.close()  # the child's ends: once it exits, reads here see EOF instead of hanging
        child_events.close()
        self._send_lock = threading.Lock()
        # request key -> (request, sink); keys, not request ids, so equal ids from callers never mix
        self._sinks: dict[int, tuple[EngineRequest, Callable[[EngineOutput], None]]] = {}
        self._keys = itertools.count()
        self._accepting = False
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._reply_lock = threading.Lock()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._last_stats: EngineStats | None = None
        kind, payload = self._receive()  # the child loads the weights: as long as an in-process load
        while kind == "progress":
            self._report(payload)
            kind, payload = self._receive()
        if kind != "built":
            self._process.join(timeout=SHUTDOWN_TIMEOUT_S)
            raise payload
        facts: EngineFacts = payload
        self.eos_token_ids = facts.eos_token_ids
        self.max_session_len = facts.max_session_len
        self.max_batch_size = facts.max_batch_size
        self.page_size = facts.page_size
        self.dtype_name = facts.dtype_name
        self._reader = threading.Thread(target=self._read_events, name="xlserve-engine-events", daemon=True)
        self._reader.start()
        self.stats()

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
    def start(self) -> None:
        """Compile in the child and wait until it serves; raises what the child's start raised."""
        self._send(("start",))
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        self._accepting = True
        self.ready = True

    def shutdown(self) -> None:
        """Stop the engine (requests still running end with ABORT) and the child."""
        self.ready = False
        try:
            self._send(("shutdown",))
        except OSError:
            pass  # the child is gone already
        self._reader.join(timeout=SHUTDOWN_TIMEOUT_S)
        self._process.join(timeout=SHUTDOWN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()

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
        with self._send_lock:  # and so with the reader's refusal of new work when the child ends
            if not self._accepting:
                raise RuntimeError("the engine is not running")
            key = next(self._keys)
            self._sinks[key] = (request, sink)
            self._commands.send(("add", key, request))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def end_session(self, session_id: str) -> None:
        self._send(("end_session", session_id))

    def stats(self) -> EngineStats:
        """The child engine's `Engine.stats()`; its last answer once the child has gone."""
        if self.alive or self._last_stats is None:
            self._last_stats = self._ask(("stats",))
        return self._last_stats

    def start_profile(self, directory: str) -> None:
        self._ask(("start_profile", directory))

    def stop_profile(self) -> None:
        self._ask(("stop_profile",))

    def _ask(self, command: tuple) -> Any:
        """Send a command and wait for the child's answer (raised if it is an exception)."""
        with self._reply_lock:  # one question at a time, so answers cannot swap
            self._send(command)
            try:
                answer = self._replies.get(timeout=REPLY_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"the engine process did not answer {command[0]!r}") from None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _send(self, command: tuple) -> None:
        with self._send_lock:
            self._commands.send(command)

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._events.recv()
        except (EOFError, OSError):
            return "exit", RuntimeError(f"the engine process ended (exit code {self._process.exitcode})")

    # ----- the reader thread -----------------------------------------------------------------------
    def _read_events(self) -> None:
        error: BaseException | None = None
        while True:
            kind, payload = self._receive()
            if kind == "outputs":
                self._deliver(payload)
            elif kind == "progress":
                self._report(payload)
            elif kind == "ready":
                self.compile_seconds = payload
                self._started.set()
            elif kind == "failed":
                self._start_error = payload
                self._started.set()
            elif kind == "reply":
                self._replies.put(payload)
            elif kind == "exit":
                error = payload
                break
        with self._send_lock:
            self._accepting = False
        self.ready = False
        if not self._started.is_set():  # the child ended while compiling
            self._start_error = error or RuntimeError("the engine process ended before it was ready")
            self._started.set()
        self._replies.put(RuntimeError("the engine process has ended"))  # a question asked just now
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
        engine = Engine.from_pretrained(model_path, config, on_startup=lambda event: send(("progress", event)))
    except BaseException as error:
        send(("failed", _portable(error)))
        return
    send(("built", EngineFacts(engine.eos_token_ids, engine.max_session_len, engine.max_batch_size,
                               engine.page_size, engine.dtype_name)))
    step_outputs: list[tuple] = []  # `_compact` outputs, appended and flushed on the engine thread only

    def flush() -> None:
        if step_outputs:
            batch = step_outputs.copy()
            step_outputs.clear()
            send(("outputs", batch))

    engine.step_listeners.append(flush)
    try:
        _serve_commands(engine, commands, send, step_outputs)
    finally:
        engine.shutdown()
        flush()  # the ABORT outputs of whatever was still running
        send(("exit", None if engine.error is None else _portable(engine.error)))


def _serve_commands(engine: Any, commands: Connection, send: Callable[[tuple], None],
                    step_outputs: list[tuple]) -> None:
    started = threading.Event()  # the engine thread runs: from now on, its end ends the child

    def start() -> None:  # off the command loop, so stats are answered while the buckets compile
        try:
            engine.start()
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
                send(("outputs", [_compact(key, EngineOutput(request.request_id, finished=True,
                                                             finish_reason=FinishReason.ERROR, error=str(error)))]))
        elif command == "abort":
            engine.abort(*args)
        elif command == "end_session":
            engine.end_session(*args)
        elif command == "start":
            threading.Thread(target=start, name="xlserve-engine-start", daemon=True).start()
        elif command == "shutdown":
            return
        else:  # questions: stats, start_profile, stop_profile
            try:
                send(("reply", getattr(engine, command)(*args)))
            except Exception as error:
                send(("reply", _portable(error)))


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
