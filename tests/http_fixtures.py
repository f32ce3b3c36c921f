"""Live servers for the HTTP tests: real Hypercorn on 127.0.0.1, real engines, the real openai SDK.

Start-up compiles every bucket, so the HTTP suite shares one in-process server (`http_server`,
the tiny Llama checkpoint with the Llama 2 tokenizer) across all its modules; test modules import
the fixture from here. It runs through the CLI's own `serve` on a thread, so tests can also look at
the engine behind it (e.g. that a disconnect left nothing running). The few tests of the other ways
in (`hypercorn serving.app:app`, the `xlserve` command) start their own processes with `ServerProcess`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.http.options import Launch
from serving.http.settings import ServerSettings

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
            if httpx.get(f"{base_url}/v1/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the server at {base_url} was not ready after {timeout}s")


@dataclass
class LiveServer:
    base_url: str
    engine: Engine
    model_name: str

    def client(self, **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **options)

    def async_client(self, **options: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **options)


class _ThreadServer:
    """`serving.cli.serve` on a thread of its own, stopped through its shutdown trigger."""

    def __init__(self, checkpoint: Path):
        from serving.cli import serve
        from serving.http.factory import create_app

        self.port = free_port()
        config = EngineConfig.from_options(**SERVER_ENGINE_OPTIONS)
        settings = ServerSettings(model_name=MODEL_NAME, model_path=str(checkpoint))
        self.engine = Engine.from_pretrained(str(checkpoint), config)
        app = create_app(self.engine, settings)
        launch = Launch(str(checkpoint), config, settings, host="127.0.0.1", port=self.port)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete,
            args=(serve(app, launch, shutdown_trigger=self._stop.wait),),
            name="http-test-server",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        self._loop.close()


_shared: LiveServer | None = None


@pytest.fixture(scope="session", name="http_server")
def shared_http_server(tiny_llama: Path) -> Iterator[LiveServer]:
    # Modules that import this fixture each get their own fixture definition; the module-level
    # cache makes them share one server (the first to start it stops it at the end of the session).
    global _shared
    if _shared is not None:
        yield _shared
        return
    server = _ThreadServer(tiny_llama)
    try:
        wait_ready(f"http://127.0.0.1:{server.port}", alive=server._thread.is_alive)
        _shared = LiveServer(f"http://127.0.0.1:{server.port}", server.engine, MODEL_NAME)
        yield _shared
    finally:
        _shared = None
        server.stop()


class ServerProcess:
    """A server in a child process (`hypercorn ...` or `xlserve ...`), with its output kept for asserts."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"xlserve-test-{os.getpid()}-{free_port()}.log"
        self._log = open(self.log_path, "w+b")
        self._final_output = ""
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
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
