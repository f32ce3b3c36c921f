"""On-demand device profiling, as vLLM and SGLang offer it: with `--profile-dir DIR`, POST /start_profile
starts a JAX profiler trace of the engine's process (XLA ops on the device, the engine thread's host
work; with --no-engine-process, the server's own process) and POST /stop_profile writes it under DIR,
in `plugins/profile/<time>/`: an `.xplane.pb` for TensorBoard or XProf and a `perfetto_trace.json.gz`
for ui.perfetto.dev. Start it while a benchmark loads the server, stop it a few seconds later.

Without the flag the routes are never registered, so they answer 404 like any unknown path and the
OpenAPI document does not list them. They are not open paths, so with API keys they need one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from quart import Quart
from quart_schema import document_response

from serving.engine.client import EngineClient
from serving.http.errors import APIError
from serving.http.protocol import ErrorResponse, ProfileStatus


class Profiler:
    """The process's one trace (JAX runs at most one), started and stopped by one request at a time."""

    def __init__(self, engine: EngineClient, directory: str):
        self.engine = engine
        # Absolute, so the answer tells where the files are whatever the server's working directory.
        self.directory = os.path.abspath(directory)
        self.running = False
        # A thread lock held in the worker thread, not an asyncio one: a client that hangs up cancels
        # its handler, but the check and the JAX call it guards still finish together, so `running`
        # always says what JAX holds.
        self._lock = threading.Lock()

    def start(self) -> ProfileStatus:
        with self._lock:
            if self.running:
                raise APIError(
                    409, "a profile is already running; POST /stop_profile writes it", code="profile_already_running"
                )
            self.engine.start_profile(self.directory)
            self.running = True
        return ProfileStatus(status="started", dir=self.directory)

    def stop(self) -> ProfileStatus:
        with self._lock:
            if not self.running:
                raise APIError(409, "no profile is running; POST /start_profile first", code="profile_not_running")
            # If writing fails, JAX keeps the trace and `running` stays true, so a retry may still write it.
            self.engine.stop_profile()
            self.running = False
        return ProfileStatus(status="stopped", dir=self.directory)


def install_profiler(app: Quart, engine: EngineClient, directory: str | None) -> None:
    if directory is None:
        return
    profiler = Profiler(engine, directory)

    # Both run on a worker thread: starting sets up the profiler session, and stopping writes files that
    # take seconds under load; the event loop keeps serving meanwhile.
    @app.post("/start_profile")
    @document_response(ProfileStatus, 200)
    @document_response(ErrorResponse, 409)
    async def start_profile() -> dict[str, Any]:
        """Start a JAX profiler trace of the server (409 if one is running)."""
        return (await asyncio.to_thread(profiler.start)).model_dump()

    @app.post("/stop_profile")
    @document_response(ProfileStatus, 200)
    @document_response(ErrorResponse, 409)
    async def stop_profile() -> dict[str, Any]:
        """Stop the trace and write it under --profile-dir (409 if none is running)."""
        return (await asyncio.to_thread(profiler.stop)).model_dump()
