"""Reliability on the shared server, observed the way an operator would: through GET /metrics and the
access log. Clients that hang up free everything at once; the metrics count exactly what was served;
every request carries an id from the response header to the log line."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.http_fixtures import LiveServer, http, scrape, shared_http_server  # noqa: F401 (`http_server`)
from tools.bench_serving import sse_lines

# vLLM's metric names (as exposed: counters end in _total, histograms in _bucket/_count/_sum) that
# dashboards built for vLLM query, plus our own.
EXPECTED_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_success_total{finished_reason=length}",
    "vllm:time_to_first_token_seconds_count",
    "vllm:time_per_output_token_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:request_prompt_tokens_count",
    "vllm:request_generation_tokens_count",
    "vllm:request_params_n_count",
    "vllm:request_params_max_tokens_count",
    "xlserve:compilations_after_warmup_total",
    "xlserve:admission_slots_running",
    "xlserve:admission_slots_queued",
    "xlserve:http_requests_in_flight",
    "process_resident_memory_bytes",
)


def settled(server: LiveServer) -> dict[str, float]:
    """Metrics once nothing runs: engine, admission and HTTP all idle."""
    assert server.engine.wait_idle(30)
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(server)
        # The scrape itself is the one request in flight.
        if samples["xlserve:http_requests_in_flight"] <= 1 or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


async def test_twenty_streams_dropped_mid_stream_free_everything_within_a_second(http_server: LiveServer) -> None:
    body = {
        "model": http_server.model_name,
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "stream": True,
        "max_tokens": None,  # up to the session length: nothing ends on its own during the test
        "ignore_eos": True,
        "temperature": 1.0,
    }
    batch = http_server.engine.max_batch_size

    readers = []  # held: dropping a line iterator would close its stream before the test means to

    async def open_stream(streams: AsyncExitStack) -> None:
        client = await streams.enter_async_context(httpx.AsyncClient(base_url=http_server.base_url, timeout=30))
        response = await streams.enter_async_context(client.stream("POST", "/v1/chat/completions", json=body))
        assert response.status_code == 200
        readers.append(sse_lines(response))
        assert (await anext(readers[-1])).startswith("data: {")  # the stream has begun

    # A slower device (20 ms a step) keeps every stream unfinished while the test looks at them.
    http_server.engine.fault_hook = lambda chunks: time.sleep(0.02)
    try:
        async with AsyncExitStack() as streams:
            await asyncio.gather(*(open_stream(streams) for _ in range(20)))
            # Every stream is mid-flight: a full batch generating, the rest queued in the engine.
            deadline = time.monotonic() + 30
            while True:
                samples = await asyncio.to_thread(scrape, http_server)
                running, waiting = samples["vllm:num_requests_running"], samples["vllm:num_requests_waiting"]
                if (running, waiting) == (batch, 20 - batch):
                    break
                assert time.monotonic() < deadline, (running, waiting)
                await asyncio.sleep(0.01)
            assert samples["vllm:kv_cache_usage_perc"] > 0
    finally:
        http_server.engine.fault_hook = None
    # Leaving the stack closed all 20 connections at once, mid-stream.
    dropped = time.monotonic()
    while True:
        samples = await asyncio.to_thread(scrape, http_server)
        freed = (
            samples["vllm:num_requests_running"],
            samples["vllm:num_requests_waiting"],
            samples["vllm:kv_cache_usage_perc"],
            samples["xlserve:admission_slots_running"],
        )
        if freed == (0, 0, 0, 0):
            break
        assert time.monotonic() - dropped < 1.0, f"still held a second after the drop: {freed}"
        await asyncio.sleep(0.02)
    # and the server still answers
    again = await http_server.async_client().chat.completions.create(
        model=http_server.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert again.choices[0].finish_reason in ("stop", "length")


def test_metrics_count_exactly_what_was_served(http_server: LiveServer) -> None:
    before = settled(http_server)
    prompt = "Hello there"
    response = http_server.client().completions.create(
        model=http_server.model_name, prompt=prompt, max_tokens=5, n=2, temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = settled(http_server)
    missing = [name for name in EXPECTED_METRICS if name not in after]
    assert not missing, f"missing from /metrics: {missing}"

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    prompt_tokens = len(http_server.engine.tokenizer.encode(prompt))
    assert response.usage.completion_tokens == 10
    assert grew("vllm:prompt_tokens_total") == 2 * prompt_tokens  # per choice: each prefills its prompt
    assert grew("vllm:generation_tokens_total") == 10
    assert grew("vllm:request_success_total{finished_reason=length}") == 2
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert grew(f"vllm:{histogram}_count") == 2
        assert grew(f"vllm:{histogram}_sum") > 0
    assert grew("vllm:request_params_n_count") == 1 and grew("vllm:request_params_n_sum") == 2
    assert grew("vllm:request_params_max_tokens_sum") == 5
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "xlserve:admission_slots_running", "xlserve:admission_slots_queued"):
        assert after[gauge] == 0, gauge
    text = http.get(f"{http_server.base_url}/metrics").headers["content-type"]
    assert text.startswith("text/plain; version=0.0.4")


def test_access_log_is_one_json_line_per_request_with_its_id(
    http_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xlserve.access")
    body = {"model": http_server.model_name, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    ours = http.post(f"{http_server.base_url}/v1/completions", json=body, headers={"X-Request-Id": "trace-42.a"})
    assert ours.status_code == 200 and ours.headers["x-request-id"] == "trace-42.a"
    # An id that could forge log structure is replaced by a fresh one.
    forged = http.get(f"{http_server.base_url}/v1/models", headers={"X-Request-Id": 'x" injected'})
    fresh = forged.headers["x-request-id"]
    assert fresh != 'x" injected' and len(fresh) == 32

    def line(request_id: str) -> dict:
        deadline = time.monotonic() + 5  # written when the exchange ends, just after the last byte
        while time.monotonic() < deadline:
            for record in caplog.records:
                if record.name == "xlserve.access" and request_id in record.getMessage():
                    return json.loads(record.getMessage())
            time.sleep(0.01)
        raise AssertionError(f"no access log line for {request_id}")

    completion = line("trace-42.a")
    assert completion["method"] == "POST" and completion["path"] == "/v1/completions"
    assert completion["status"] == 200 and completion["client_disconnected"] is False
    assert completion["completion_tokens"] == 3 and completion["finish_reasons"] == ["length"]
    assert completion["prompt_tokens"] == len(http_server.engine.tokenizer.encode("Hi"))
    assert completion["duration_ms"] > 0 and completion["bytes_sent"] == len(ours.content)
    assert line(fresh)["path"] == "/v1/models"
