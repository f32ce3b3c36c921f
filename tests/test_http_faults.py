"""Engine faults seen over HTTP, with the real engine made to fail through its test-only `fault_hook`:
a failing step fails only its own requests (500 in OpenAI's body, or an error event in a stream) and
the engine serves on; a wedged engine thread is found stuck by the watchdog (`--engine-stall-timeout`)
and a request without a first token in time gets a 503 (`--first-token-timeout`); steps failing again
and again kill the engine thread, and then both probes say so instead of the server hanging.
(`test_http_hardening.py` stops and kills a real engine process.)

The last test kills this module's engine, so it stays last in this file.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.client import body_lines
from serving.engine.engine import MAX_CONSECUTIVE_STEP_FAILURES
from serving.engine.scheduler import Chunk
from tests.http_fixtures import LiveServer, http, scrape, serve_in_thread

MARKED_MAX_TOKENS = 7  # the requests a test's fault hook fails
STALL_TIMEOUT_S = 4.0
FIRST_TOKEN_TIMEOUT_S = 1.5


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[LiveServer]:
    with serve_in_thread(tiny_llama, engine_stall_timeout=STALL_TIMEOUT_S,
                         first_token_timeout=FIRST_TOKEN_TIMEOUT_S) as (live, _):
        yield live


def completion(server: LiveServer, **fields: object) -> dict:
    return {"model": server.model_name, "prompt": "Once upon a time", "ignore_eos": True, **fields}


def events(response: httpx.Response) -> list[dict | str]:
    data = [line.removeprefix("data: ") for line in body_lines(response) if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_a_failing_step_fails_only_its_requests(server: LiveServer) -> None:
    def fail_marked(chunks: list[Chunk]) -> None:
        time.sleep(0.01)  # a slower device, so the bystander is still generating meanwhile
        if any(c.request.config.max_new_tokens == MARKED_MAX_TOKENS for c in chunks):
            raise InjectedFault("injected fault")

    before = scrape(server)
    server.engine.fault_hook = fail_marked
    url = f"{server.base_url}/v1/completions"
    try:
        with http.stream("POST", url, json=completion(server, max_tokens=60, stream=True), timeout=60) as bystander:
            lines = body_lines(bystander)
            assert next(lines).startswith("data: {")  # generating while the others fail
            failed = http.post(url, json=completion(server, max_tokens=MARKED_MAX_TOKENS), timeout=60)
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "engine_error")
            assert "injected fault" in error["message"]
            with http.stream("POST", url, json=completion(server, max_tokens=MARKED_MAX_TOKENS, stream=True),
                             timeout=60) as failed_stream:
                assert failed_stream.status_code == 200
                streamed = events(failed_stream)
            assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["code"] == "engine_error"
            rest = [json.loads(x.removeprefix("data: ")) for x in lines if x.startswith("data: {")]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"  # the bystander ran to the end
        after = http.post(url, json=completion(server, max_tokens=5), timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5
    finally:
        server.engine.fault_hook = None
    assert server.engine.alive and server.engine.wait_idle(30)
    assert server.engine.stats().num_pages_used == 0
    samples = scrape(server)
    key = "xlserve:request_errors_total{code=engine_error}"
    assert samples[key] - before.get(key, 0) == 2


def test_a_wedged_engine_thread_is_found_stuck_and_recovers(server: LiveServer) -> None:
    """The engine thread blocks in a step (a deadlock, a hung device): probes keep answering at once, and
    after the stall timeout both say `engine_stalled` and the waiting request fails with a 503 it may
    retry; once the step returns, the server serves again. (It blocks after the request's first token,
    which the shorter first-token timeout would otherwise end first.)"""
    release = threading.Event()

    def wedge_after_first_token(chunks: list[Chunk]) -> None:
        if any(c.step >= 2 for c in chunks):  # the first token was read back and sent on
            release.wait(60)

    server.engine.fault_hook = wedge_after_first_token
    url = f"{server.base_url}/v1/completions"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, url, json=completion(server, max_tokens=20), timeout=60)
            began = time.monotonic()
            while (health := http.get(f"{server.base_url}/health")).status_code == 200:
                assert time.monotonic() - began < STALL_TIMEOUT_S + 5, "the stall was not noticed"
                time.sleep(0.05)
            assert time.monotonic() - began >= STALL_TIMEOUT_S - 1  # the heartbeat was up to a turn old
            assert health.json()["error"]["code"] == "engine_stalled"
            ready = http.get(f"{server.base_url}/v1/ready")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_stalled"
            failed = waiting.result()
        assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
        assert failed.json()["error"]["code"] == "engine_stalled"
        probe = time.monotonic()
        http.get(f"{server.base_url}/health")
        assert time.monotonic() - probe < 0.1
    finally:
        server.engine.fault_hook = None
        release.set()
    deadline = time.monotonic() + 10
    while http.get(f"{server.base_url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not notice the engine move again"
        time.sleep(0.05)
    served = http.post(url, json=completion(server, max_tokens=3), timeout=60)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3
    assert server.engine.wait_idle(30) and server.engine.stats().num_pages_used == 0


def test_a_request_without_a_first_token_in_time_gets_a_retryable_503(server: LiveServer) -> None:
    """Its prefill takes longer than --first-token-timeout (though less than the stall timeout): a 503
    with Retry-After, and the engine frees what the request held."""

    def slow_marked_prefill(chunks: list[Chunk]) -> None:
        if any(c.request.config.max_new_tokens == MARKED_MAX_TOKENS and c.first for c in chunks):
            time.sleep(FIRST_TOKEN_TIMEOUT_S + 0.7)

    server.engine.fault_hook = slow_marked_prefill
    try:
        began = time.monotonic()
        late = http.post(f"{server.base_url}/v1/completions", json=completion(server, max_tokens=MARKED_MAX_TOKENS),
                         timeout=60)
        waited = time.monotonic() - began
    finally:
        server.engine.fault_hook = None
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert late.json()["error"]["code"] == "first_token_timeout"
    assert FIRST_TOKEN_TIMEOUT_S <= waited < FIRST_TOKEN_TIMEOUT_S + 1, waited
    assert server.engine.wait_idle(30) and server.engine.stats().num_pages_used == 0
    assert http.get(f"{server.base_url}/health").status_code == 200  # slow is not stuck


def test_a_dead_engine_turns_both_probes_false(server: LiveServer) -> None:
    def always_fail(chunks: list[Chunk]) -> None:
        raise InjectedFault("the device is gone")

    server.engine.fault_hook = always_fail
    url = f"{server.base_url}/v1/completions"
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):  # each request's step fails; the last failure is fatal
        failed = http.post(url, json=completion(server, max_tokens=3), timeout=60)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    deadline = time.monotonic() + 10
    while server.engine.alive:
        assert time.monotonic() < deadline, "the engine thread should have stopped"
        time.sleep(0.01)
    for probe in ("/health", "/v1/ready"):
        response = http.get(server.base_url + probe)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped", probe
    refused = http.post(url, json=completion(server, max_tokens=3), timeout=60)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
    assert scrape(server)["vllm:num_requests_running"] == 0  # metrics still answer
