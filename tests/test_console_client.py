"""`xlserve serve api_client URL`, driven as a user would: a subprocess with lines on its stdin, its
streamed answers read from its stdout, and Ctrl-C (SIGINT) in the middle of an answer."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from serving.client import APIClient
from tests.http_fixtures import LiveServer, console_script, free_port, shared_http_server  # noqa: F401

PROMPT = ">>> "


class Console:
    """The console client in a child process; everything it prints is collected by a reader thread."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [console_script("xlserve"), "serve", "api_client", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while piece := self.process.stdout.read(1):
            self._output.append(piece)

    @property
    def output(self) -> str:
        return "".join(self._output)

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until `text` has been printed `count` times."""
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            assert self.process.poll() is None or self.output.count(text) >= count, self.output
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s; the console printed:\n{self.output}"
            time.sleep(0.02)

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        status = self.process.wait(timeout)
        self._reader.join(5)
        return status


@pytest.fixture
def console(http_server: LiveServer) -> Iterator[Console]:
    client = Console(http_server.base_url, "--session-id", "7")
    yield client
    if client.process.poll() is None:
        client.process.kill()
        client.finish()
    if http_server.state.sessions.get(7) is not None:  # a test that failed midway: end it as a user would,
        with APIClient(http_server.base_url, api_key=http_server.api_key) as api:  # so the module's server
            api.end_session(7)  # holds no page for the tests after it


def answers(output: str) -> list[str]:
    """The text printed after each prompt."""
    return [part.strip() for part in output.split(PROMPT)[1:]]


def test_a_conversation_end_starts_over_exit_quits(console: Console, http_server: LiveServer) -> None:
    console.wait_for(PROMPT)
    assert "session 7" in console.output and http_server.model_name in console.output
    prompts = 1

    def say(line: str) -> str:
        nonlocal prompts
        console.type(line)
        prompts += 1
        console.wait_for(PROMPT, prompts)
        return answers(console.output)[prompts - 2]  # the text between the last two prompts

    assert say("Hello there")
    # No length given: an answer runs to the session's end, unless the random model samples its end-of-sequence
    # token first (the console samples at LMDeploy's temperature 0.8): then the conversation goes on until full.
    while len(http_server.state.sessions.get(7).history) < http_server.engine.max_session_len:
        assert prompts < 20, console.output
        if "session 7 is full" in say("Go on"):
            break
    else:
        assert "session 7 is full" in say("Anything more?")
    assert "(a new conversation)" in say("end")
    assert http_server.state.sessions.get(7) is None
    assert say("Hello again") and http_server.state.sessions.get(7) is not None
    console.type("exit")
    assert console.finish() == 0
    assert http_server.state.sessions.get(7) is None


def test_ctrl_c_cancels_the_answer_being_written(console: Console, http_server: LiveServer) -> None:
    console.wait_for(PROMPT)
    http_server.engine.fault_hook = lambda chunks: time.sleep(0.05)  # a slow answer: 20 tokens a second
    try:
        console.type("Tell me a long story")
        deadline = time.monotonic() + 60
        while not answers(console.output) or not answers(console.output)[0]:
            assert time.monotonic() < deadline, console.output
            time.sleep(0.02)  # until the answer has begun to stream
        console.process.send_signal(signal.SIGINT)
        console.wait_for("[cancelled]")
    finally:
        http_server.engine.fault_hook = None
    console.wait_for(PROMPT, 2)
    assert http_server.state.sessions.get(7) is None  # a cancelled first turn leaves no history
    console.type("Hi")
    console.wait_for(PROMPT, 3)
    tokenizer = http_server.engine.tokenizer
    history = http_server.state.sessions.get(7).history
    assert tokenizer.decode(history, skip_special_tokens=False).startswith("<s>[INST] Hi [/INST]")
    console.type("exit")
    assert console.finish() == 0


def test_an_unreachable_server_is_a_clear_error() -> None:
    console = Console(f"http://127.0.0.1:{free_port()}")
    assert console.finish() == 1
    assert "cannot reach the server" in console.output
