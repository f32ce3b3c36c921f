"""The engine as the app sees it: started in the background when serving begins, stopped at the end.

Compiling every bucket takes from seconds (CPU, test buckets) to minutes (GPU), so the engine starts
on a thread of its own while Hypercorn already answers: `/health` says the process lives, `/v1/ready`
answers 503 until the engine is compiled, and generation routes answer 503 meanwhile. A load failure
is kept and reported by both probes (and ends the CLI's server) rather than leaving a server that
never becomes ready.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from quart import current_app

from serving.engine.engine import Engine
from serving.http.errors import APIError
from serving.http.settings import ServerSettings

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: BaseException | None = None
    started: bool = False  # engine.start() returned: from now on its thread must stay alive
    # Set once the engine is ready or failed, so the CLI can stop a server whose model failed to load.
    settled: threading.Event = field(default_factory=threading.Event)

    def start_in_background(self) -> None:
        # A daemon: a compile still running when the server is told to stop must not hold up the exit.
        threading.Thread(target=self._start, name="xlserve-engine-start", daemon=True).start()

    def _start(self) -> None:
        began = time.monotonic()
        try:
            self.engine.start()
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

    def shutdown(self) -> None:
        self.engine.shutdown()

    @property
    def healthy(self) -> bool:
        """Alive: loading, or started with a running engine thread; not after a failure or a crash."""
        return self.load_error is None and (not self.started or self.engine.alive)

    def require_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.settings.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.started and not self.engine.alive:
            raise APIError(503, "the engine has stopped; see the server log", code="engine_stopped")
        if not self.engine.ready:
            raise APIError(
                503,
                "the model is still loading; retry when GET /v1/ready answers 200",
                code="model_not_ready",
            )


def server_state() -> ServerState:
    return current_app.extensions["xlserve"]
