"""The engine as the app sees it: started in the background when serving begins, drained and stopped
at the end.

Compiling every bucket takes from seconds (CPU, test buckets) to minutes (GPU), so the engine starts
on a thread of its own while Hypercorn already answers: `/health` says the process lives, `/v1/ready`
answers 503 until the engine can serve (its essential buckets compiled; the rest compile in the
background, `Engine.start`), and generation routes answer 503 meanwhile. A load failure
is kept and reported by both probes (and ends the CLI's server) rather than leaving a server that
never becomes ready.

A graceful shutdown (`drain`) turns readiness false and refuses new requests with 503 while the
requests in flight finish; whatever still runs when the shutdown timeout ends is aborted. Requests
still sending their body when it begins are refused at once (503), so an upload that never ends
cannot hold the shutdown open.

A watchdog on the event loop (`--engine-stall-timeout`) tells a stuck engine from an idle one: the
engine turns its loop about once a second even when idle (`EngineClient.heartbeat`), so a heartbeat
older than the timeout while requests wait on it means a deadlock or a wedged device. Both probes then
answer 503 `engine_stalled` and the waiting requests fail with a 503 their clients may retry, until the
engine moves again. Nothing on the event loop ever waits for the engine itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from quart import current_app

from serving.engine.client import EngineClient
from serving.http.admission import Admission
from serving.http.engine_client import AsyncEngineClient
from serving.http.errors import APIError, server_shutting_down, unavailable
from serving.http.metrics import ServerMetrics
from serving.http.preparation import PromptPreparation
from serving.http.prompts import turn_end_ids
from serving.http.protocol import MAX_N
from serving.http.sessions import SessionRegistry
from serving.http.settings import ServerSettings
from serving.text.grammar import GuideCompiler

if TYPE_CHECKING:
    from serving.http.exchange import Exchange

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Paths still answered while draining: probes say what is happening, and metrics show the drain.
DRAIN_OPEN_PATHS = frozenset({"/health", "/v1/ready", "/metrics"})
# After the shutdown timeout, aborted requests get this long to send their error and `[DONE]`.
ABORT_GRACE_S = 5.0
# The stall watchdog looks this often (at most), so a stall is noticed within a second of its timeout.
WATCHDOG_PERIOD_S = 1.0


def default_max_running(engine: EngineClient) -> int:
    """Twice what the engine decodes at once, so its own queue always holds the next batch, and never
    fewer than one request's largest `n`."""
    return max(2 * engine.max_batch_size, MAX_N)


@dataclass
class ServerState:
    engine: EngineClient
    settings: ServerSettings
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: BaseException | None = None
    started: bool = False  # engine.start() returned: from now on its thread must stay alive
    # Set once the engine is ready or failed, so the CLI can stop a server whose model failed to load.
    settled: threading.Event = field(default_factory=threading.Event)
    draining: bool = False
    admission: Admission = field(init=False)
    metrics: ServerMetrics = field(init=False)
    in_flight: set[Exchange] = field(init=False, default_factory=set)  # every HTTP request being served
    sessions: SessionRegistry = field(init=False)  # /v1/chat/interactive's histories
    prompts: PromptPreparation = field(init=False, default_factory=PromptPreparation)  # templates, tokenizing
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _engine_client: AsyncEngineClient | None = field(init=False, default=None)
    # The engine's heartbeat when the watchdog found it stuck; None while it is not (see the docstring).
    _stalled_at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        max_running = self.settings.max_concurrent_requests or default_max_running(self.engine)
        self.admission = Admission(max_running, self.settings.max_queue_len)
        self.sessions = SessionRegistry(self.engine.end_session)
        self.metrics = ServerMetrics(self.settings.model_name, self.engine.max_session_len)
        self.metrics.watch(self.engine, self.admission, self.in_flight, self.sessions)
        self._idle.set()

    @functools.cached_property
    def guides(self) -> GuideCompiler:
        """Structured-output constraints compiled for the served tokenizer, cached (serving.http.guided)."""
        return GuideCompiler(self.engine.tokenizer, self.engine.model_config.vocab_size)

    @functools.cached_property
    def turn_end_ids(self) -> frozenset[int]:
        """Token ids that end an assistant turn in the served chat template: they stop answers like an EOS."""
        return turn_end_ids(self.engine.tokenizer, self.settings.chat_template)

    @property
    def engine_client(self) -> AsyncEngineClient:
        """The engine's asyncio client for the serving event loop (made on first use, inside that loop)."""
        if self._engine_client is None:
            self._engine_client = AsyncEngineClient(self.engine, asyncio.get_running_loop())
        return self._engine_client

    def start_in_background(self) -> None:
        """Start the engine on a thread (called on the serving event loop, which the watchdog then uses)."""
        # A daemon: a compile still running when the server is told to stop must not hold up the exit.
        threading.Thread(target=self._start, name="xlserve-engine-start", daemon=True).start()
        if self.settings.engine_stall_timeout:
            # A timer, not a task: nothing to cancel when the loop ends.
            asyncio.get_running_loop().call_later(self._watchdog_period, self._watch_engine)

    @property
    def _watchdog_period(self) -> float:
        return min(WATCHDOG_PERIOD_S, self.settings.engine_stall_timeout / 4)

    def _watch_engine(self) -> None:
        asyncio.get_running_loop().call_later(self._watchdog_period, self._watch_engine)
        if not self.started or not self.engine.alive or self._engine_client is None:
            return
        heartbeat = self.engine.heartbeat
        timeout = self.settings.engine_stall_timeout
        if self._stalled_at is not None and heartbeat != self._stalled_at:
            logger.warning("the engine is making progress again")
            self._stalled_at = None
        elif self._stalled_at is None and self._engine_client.busy and time.monotonic() - heartbeat > timeout:
            logger.error("the engine has made no progress for %.0fs with requests waiting on it; failing them "
                         "(--engine-stall-timeout)", time.monotonic() - heartbeat)
            self._stalled_at = heartbeat
        if self._stalled_at is not None:
            self._engine_client.fail_all(self._stalled_error())

    @property
    def stalled(self) -> bool:
        """The engine has work but has stood still for --engine-stall-timeout (and not moved since)."""
        return self._stalled_at is not None

    def _stalled_error(self) -> APIError:
        return unavailable(
            f"the engine has made no progress for over {self.settings.engine_stall_timeout:.0f}s "
            "(--engine-stall-timeout); retry, or send the request to another replica",
            "engine_stalled",
        )

    def _start(self) -> None:
        began = time.monotonic()
        try:
            # Ready as soon as the engine can serve every request (its essential buckets); the other buckets
            # compile in the background, /metrics counting them down (xlserve:startup_buckets_remaining).
            self.engine.start(serve_early=True)
        except BaseException as error:  # reported by /health and /v1/ready, and logged with its trace
            logger.exception("the engine failed to start")
            self.load_error = error
        else:
            self.started = True
            logger.info("%s is ready (start-up took %.1fs)", self.settings.model_name, time.monotonic() - began)
        finally:
            self.settled.set()

    @property
    def generation_defaults(self) -> dict[str, float | int]:
        """Sampling defaults from the checkpoint's generation_config.json."""
        return dict(self.engine.model_config.generation_defaults)

    async def prepare_prompt(self, chars: int, work: Callable[[], T]) -> T:
        """`work()` (rendering and encoding a prompt of `chars` characters) on the prompt pool; its 503
        when too many large prompts wait counts as a refusal, as admission's do."""
        try:
            return await self.prompts.run(chars, work)
        except APIError as error:
            if error.status == 503:  # the pool's refusal, not the prompt's own 400
                self.metrics.reject(error.code or "server_overloaded")
            raise

    def shutdown(self) -> None:
        if self._engine_client is not None:
            self._engine_client.close()
        self.prompts.shutdown()
        self.engine.shutdown()

    # ----- requests in flight and the graceful shutdown ------------------------------------------------
    def enter(self, exchange: Exchange) -> None:
        self.in_flight.add(exchange)
        self._idle.clear()

    def leave(self, exchange: Exchange) -> None:
        self.in_flight.discard(exchange)
        if not self.in_flight:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests (and those still sending their body) and wait up to `timeout` seconds for
        those in flight; then abort what is left (streams end with an error event and `[DONE]`). True if
        everything finished in time."""
        self.draining = True
        for exchange in self.in_flight:
            exchange.refuse_body()
        logger.warning("shutting down: %d requests in flight get up to %.0fs to finish", len(self.in_flight), timeout)
        if await self._wait_idle(timeout):
            return True
        logger.warning("aborting %d requests still in flight after %.0fs", len(self.in_flight), timeout)
        # Stopping the engine ends every engine request with ABORT; their handlers answer and return.
        await asyncio.to_thread(self.engine.shutdown)
        await self._wait_idle(ABORT_GRACE_S)
        return False

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def refuse_while_draining(self, path: str) -> None:
        if self.draining and path not in DRAIN_OPEN_PATHS:
            self.metrics.reject("server_shutting_down")
            raise server_shutting_down()

    @property
    def healthy(self) -> bool:
        """Alive: loading, or started with a running engine that is not stuck."""
        return self.health_error() is None

    def health_error(self) -> APIError | None:
        """Why the server is not alive (a failed load, an engine that crashed or is stuck), as /health's 503."""
        if self.load_error is not None:
            return APIError(503, f"the engine is down: {self.load_error}", code="engine_stopped")
        if self.started and not self.engine.alive:
            return APIError(503, "the engine is down: it has stopped; see the server log", code="engine_stopped")
        if self.stalled:
            return self._stalled_error()
        return None

    def require_model(self, name: str) -> None:
        if name != self.settings.model_name:
            shown = name if len(name) <= 256 else f"{name[:256]}..."  # echo what was sent, within reason
            raise APIError(
                404,
                f"The model `{shown}` does not exist; this server serves `{self.settings.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def require_ready(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.started and not self.engine.alive:
            raise unavailable("the engine has stopped; see the server log", "engine_stopped")
        if self.stalled:
            raise self._stalled_error()
        if not self.engine.ready:
            raise APIError(
                503,
                "the model is still loading; retry when GET /v1/ready answers 200",
                code="model_not_ready",
            )


def server_state() -> ServerState:
    return current_app.extensions["xlserve"]
