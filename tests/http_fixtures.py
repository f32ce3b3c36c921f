"""Live servers for the HTTP tests: real Hypercorn on 127.0.0.1, real engines, the real openai SDK.

Start-up compiles every bucket, so the HTTP suite shares one in-process server (`http_server`,
the tiny Llama checkpoint with the Llama 2 tokenizer) across all its modules; test modules import
the fixture from here. It runs through the CLI's own `serve` on a thread, so tests can also look at
the engine and app behind it (e.g. that a disconnect left nothing running). Tests that need other
server settings (API keys, small limits) start their own with `serve_in_thread`, on fewer buckets
(`FEW_BUCKETS`) so they compile in about half the time. The few tests of the other ways in
(`hypercorn serving.app:app`, the `xlserve` command) start their own processes with `ServerProcess`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from quart import Quart

from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.http.options import Launch
from serving.http.settings import ServerSettings
from serving.http.state import ServerState

MODEL_NAME = "tiny-llama"
# Few shapes keep start-up short on a 2-core CI machine, yet still cover batching (decode batch 4),
# padding (prefill rows 1-2) and chunked prefill (prompts over 64 tokens). 64 pages of 16 tokens hold
# about 8 full-length sequences, so the concurrency tests do not spend their time preempting.
SERVER_ENGINE_OPTIONS = dict(
    page_size=16,
    num_pages=65,
    session_len=128,
    decode_batch_buckets=(1, 4),
    prefill_row_buckets=(1, 2),
    prefill_token_buckets=(16, 64),
)
# For the extra servers: one prefill shape (prompts are prefilled 16 tokens a step).
FEW_BUCKETS = dict(SERVER_ENGINE_OPTIONS, prefill_row_buckets=(1,), prefill_token_buckets=(16,))
# The same for the subprocess servers, as flags.
SMALL_BUCKET_FLAGS = [
    "--session-len",
    "128",
    "--cache-block-seq-len",
    "16",
    "--num-pages",
    "33",
    "--decode-batch-buckets",
    "1",
    "4",
    "--prefill-row-buckets",
    "1",
    "--prefill-token-buckets",
    "16",
    "64",
]
STARTUP_TIMEOUT_S = 300
# One TLS context for the tests' HTTP clients. httpx loads the CA certificates into a new one for every client
# it makes (20-30 ms), and a top-level `httpx.get(...)` or a new `openai.OpenAI` makes a client each time:
# thousands of times in a run. Nothing here speaks TLS; this is the context httpx would make.
TLS = httpx.create_ssl_context()
# One-off requests as `httpx.get(...)` and friends make them (a new connection each, closed after it), without
# making a client and a TLS context each time. Thread-safe; no server here sets cookies it could carry over.
http = httpx.Client(verify=TLS, limits=httpx.Limits(max_keepalive_connections=0))


def openai_client(base_url: str, api_key: str, **options: Any) -> openai.OpenAI:
    """`openai.OpenAI(...)` over a client with the shared TLS context (the SDK's defaults otherwise)."""
    return openai.OpenAI(base_url=base_url, api_key=api_key, http_client=openai.DefaultHttpxClient(verify=TLS),
                         **options)


def anthropic_client(base_url: str, api_key: str, **options: Any) -> Any:  # anthropic.Anthropic
    """`anthropic.Anthropic(...)` over a client with the shared TLS context (imported here: only the Messages
    API's tests use the SDK)."""
    import anthropic

    return anthropic.Anthropic(base_url=base_url, api_key=api_key, http_client=anthropic.DefaultHttpxClient(verify=TLS),
                               **options)


def async_openai_client(base_url: str, api_key: str, **options: Any) -> openai.AsyncOpenAI:
    """`openai.AsyncOpenAI(...)` over a client with the shared TLS context (the SDK's defaults otherwise)."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key,
                              http_client=openai.DefaultAsyncHttpxClient(verify=TLS), **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout: float = STARTUP_TIMEOUT_S, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll GET /v1/ready until 200 (the engine compiled), failing fast if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {base_url} exited before it became ready")
        try:
            if http.get(f"{base_url}/v1/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # a poll costs a millisecond or two (the shared client)
    raise TimeoutError(f"the server at {base_url} was not ready after {timeout}s")


@dataclass
class LiveServer:
    base_url: str
    engine: Engine
    model_name: str
    app: Quart
    loop: asyncio.AbstractEventLoop  # the server's event loop (on its own thread)
    api_key: str = "unused"

    @property
    def state(self) -> ServerState:
        return self.app.extensions["xlserve"]

    def client(self, **options: Any) -> openai.OpenAI:
        return openai_client(f"{self.base_url}/v1", self.api_key, max_retries=0, **options)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        return async_openai_client(f"{self.base_url}/v1", self.api_key, max_retries=0, **options)


class _ThreadServer:
    """`serving.cli.serve` on a thread of its own, stopped through its shutdown trigger."""

    def __init__(self, checkpoint: Path, engine_options: dict, shutdown_timeout: float, **settings: Any):
        from serving.cli import serve
        from serving.http.factory import create_app

        self.port = free_port()
        config = EngineConfig.from_options(**engine_options)
        server_settings = ServerSettings(model_name=MODEL_NAME, model_path=str(checkpoint), **settings)
        self.engine = Engine.from_pretrained(str(checkpoint), config)
        self.app = create_app(self.engine, server_settings)
        launch = Launch(
            str(checkpoint), config, server_settings, host="127.0.0.1", port=self.port,
            shutdown_timeout=shutdown_timeout,
        )
        self.loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.exit_status: int | None = None
        self._thread = threading.Thread(target=self._run, args=(serve(self.app, launch, self._stop.wait),),
                                        name="http-test-server", daemon=True)
        self._thread.start()

    def _run(self, serving: Any) -> None:
        self.exit_status = self.loop.run_until_complete(serving)

    def stop(self, timeout: float = 60) -> None:
        """Shut down as on SIGTERM (drain, then close); returns once `serve` has returned."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=timeout)
        if not self.loop.is_closed() and not self._thread.is_alive():
            self.loop.close()


@contextmanager
def serve_in_thread(
    checkpoint: Path,
    engine_options: dict = FEW_BUCKETS,
    shutdown_timeout: float = 5.0,
    all_buckets: bool = True,
    **settings: Any,
) -> Iterator[tuple[LiveServer, _ThreadServer]]:
    """A server with its own engine and `ServerSettings(**settings)`, stopped on exit. It serves once its
    essential buckets are compiled; with `all_buckets` this waits for the rest too, so that a test's steps
    are batched as a fully started server batches them."""
    server = _ThreadServer(checkpoint, engine_options, shutdown_timeout, **settings)
    try:
        base_url = f"http://127.0.0.1:{server.port}"
        wait_ready(base_url, alive=server._thread.is_alive)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while all_buckets and server.engine.buckets_remaining:
            assert time.monotonic() < deadline, "the buckets did not all compile"
            time.sleep(0.05)
        keys = settings.get("api_keys") or ("unused",)
        yield LiveServer(base_url, server.engine, MODEL_NAME, server.app, server.loop, api_key=keys[0]), server
    finally:
        server.stop()


_shared: LiveServer | None = None


@pytest.fixture(scope="session", name="http_server")
def shared_http_server(tiny_llama: Path) -> Iterator[LiveServer]:
    # Modules that import this fixture each get their own fixture definition; the module-level
    # cache makes them share one server (the first to start it stops it at the end of the session).
    global _shared
    if _shared is not None:
        yield _shared
        return
    with serve_in_thread(tiny_llama, SERVER_ENGINE_OPTIONS) as (server, _):
        _shared = server
        try:
            yield server
        finally:
            _shared = None


class ServerProcess:
    """A server in a child process (`hypercorn ...` or `xlserve ...`), with its output kept for asserts."""

    def __init__(self, command: list[str], env: dict[str, str | None] | None = None, cwd: Path | None = None):
        """`env` entries add to this process's environment; a None value removes that variable."""
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"xlserve-test-{os.getpid()}-{free_port()}.log"
        self._log = open(self.log_path, "w+b")
        self._final_output = ""
        environment = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command,
            env={name: value for name, value in environment.items() if value is not None},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd or Path(__file__).resolve().parents[1],
        )

    def wait_until(self, condition: Callable[[], bool], timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll `condition` (connection errors count as False) while the process lives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"condition not met while the server ran; its output:\n{self.output()}")

    def wait_ready(self, base_url: str) -> None:
        try:
            wait_ready(base_url, alive=lambda: self.process.poll() is None)
        except (RuntimeError, TimeoutError) as error:
            raise AssertionError(f"{error}; its output:\n{self.output()}") from error

    def output(self) -> str:
        """Everything it printed so far (or in all, once stopped)."""
        if self._log.closed:
            return self._final_output
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal it and wait; returns the exit status (killing it if it hangs, which then fails the test)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the server did not exit {timeout}s after signal {signum}:\n{self.output()}"
            ) from None
        finally:
            self._final_output = self.output()
            self._log.close()
            self.log_path.unlink(missing_ok=True)


def console_script(name: str) -> str:
    """The path of an installed console script of this venv (`pip install -e .` installs `xlserve`)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the project (pip install -e '.[test]')")
    return str(path)


def scrape(server: LiveServer) -> dict[str, float]:
    """GET /metrics as `{sample: value}`; a sample is its name, plus its labels other than model_name
    in braces (`vllm:request_success_total{finished_reason=length}`)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {server.api_key}"})
    assert response.status_code == 200, response.text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def all_compiled(output: bytes) -> bool:
    """The server is ready and every bucket compiled (in the ready line, or in the line after it)."""
    return b"ready after" in output and (b"buckets compiled after" in output or
                                         re.search(rb"ready after .*, \d+ buckets compiled in", output) is not None)
