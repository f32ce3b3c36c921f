"""Engine faults seen over HTTP, with the real engine made to fail through its test-only `fault_hook`:
a failing step fails only its own requests (500 in OpenAI's body, or an error event in a stream) and
the engine serves on; steps failing again and again kill the engine thread, and then both probes
say so instead of the server hanging.

The last test kills this module's engine, so it stays last in this file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.client import body_lines
from serving.engine.engine import MAX_CONSECUTIVE_STEP_FAILURES
from serving.engine.scheduler import Chunk
from tests.http_fixtures import LiveServer, scrape, serve_in_thread

MARKED_MAX_TOKENS = 7  # the requests a test's fault hook fails


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[LiveServer]:
    with serve_in_thread(tiny_llama) as (live, _):
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
        with httpx.stream("POST", url, json=completion(server, max_tokens=60, stream=True), timeout=60) as bystander:
            lines = body_lines(bystander)
            assert next(lines).startswith("data: {")  # generating while the others fail
            failed = httpx.post(url, json=completion(server, max_tokens=MARKED_MAX_TOKENS), timeout=60)
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "engine_error")
            assert "injected fault" in error["message"]
            with httpx.stream("POST", url, json=completion(server, max_tokens=MARKED_MAX_TOKENS, stream=True),
                              timeout=60) as failed_stream:
                assert failed_stream.status_code == 200
                streamed = events(failed_stream)
            assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["code"] == "engine_error"
            rest = [json.loads(x.removeprefix("data: ")) for x in lines if x.startswith("data: {")]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"  # the bystander ran to the end
        after = httpx.post(url, json=completion(server, max_tokens=5), timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5
    finally:
        server.engine.fault_hook = None
    assert server.engine.alive and server.engine.wait_idle(30)
    assert server.engine.stats().num_pages_used == 0
    samples = scrape(server)
    key = "xlserve:request_errors_total{code=engine_error}"
    assert samples[key] - before.get(key, 0) == 2


def test_a_dead_engine_turns_both_probes_false(server: LiveServer) -> None:
    def always_fail(chunks: list[Chunk]) -> None:
        raise InjectedFault("the device is gone")

    server.engine.fault_hook = always_fail
    url = f"{server.base_url}/v1/completions"
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):  # each request's step fails; the last failure is fatal
        failed = httpx.post(url, json=completion(server, max_tokens=3), timeout=60)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    deadline = time.monotonic() + 10
    while server.engine.alive:
        assert time.monotonic() < deadline, "the engine thread should have stopped"
        time.sleep(0.01)
    for probe in ("/health", "/v1/ready"):
        response = httpx.get(server.base_url + probe)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped", probe
    refused = httpx.post(url, json=completion(server, max_tokens=3), timeout=60)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
    assert scrape(server)["vllm:num_requests_running"] == 0  # metrics still answer
