"""Soak: 2,000 mixed requests against the shared server (chat and completions, streamed and not,
with `n`, stop strings and several prompts, a quarter of them abandoned by their client midway),
then proof that nothing leaked: no KV page, engine sequence, admission slot, HTTP request, event-loop
task or thread is left over, and memory stays flat. Tiny `max_tokens` keep it to well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest

from tests.http_fixtures import LiveServer, shared_http_server  # noqa: F401 (`http_server`)
from tools.bench_serving import sse_lines

pytestmark = pytest.mark.slow  # the long tier: `pytest -m "not slow"` leaves it out

TOTAL = 2000
WARM_UP = 400  # requests before the baseline is taken (pools, caches and lazy imports fill up first)
CONCURRENCY = 16
# Python's allocator keeps freed memory around; a real leak of even 30 KB per request is 48 MiB here.
MAX_RSS_GROWTH = 48 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def request_for(i: int, model: str) -> tuple[str, dict, str]:
    """(path, body, how the client behaves: 'read', 'stream', 'drop' mid-stream or 'cancel' mid-wait)."""
    messages = [{"role": "user", "content": f"Question {i}: what comes next?"}]
    common = {"model": model, "max_tokens": 1 + i % 3, "temperature": 1.0, "seed": i}
    kind = i % 8
    if kind == 0:
        return "/v1/completions", {**common, "prompt": f"Story {i}:", "n": 1 + i % 3, "stop": [" the", "\n"]}, "read"
    if kind == 1:
        body = {**common, "prompt": f"List {i}", "stream": True, "stream_options": {"include_usage": True}}
        return "/v1/completions", body, "stream"
    if kind == 2:
        return "/v1/chat/completions", {**common, "messages": messages}, "read"
    if kind == 3:
        return "/v1/chat/completions", {**common, "messages": messages, "n": 2, "stream": True}, "stream"
    if kind == 4:
        body = {**common, "messages": messages, "max_tokens": 64, "ignore_eos": True, "stream": True}
        return "/v1/chat/completions", body, "drop"
    if kind == 5:
        body = {**common, "prompt": f"Essay {i}", "max_tokens": 64, "ignore_eos": True}
        return "/v1/completions", body, "cancel"
    if kind == 6:
        body = {**common, "prompt": f"Poem {i}", "stop": "e", "stream": True, "n": 2}
        return "/v1/completions", body, "stream"
    return "/v1/completions", {**common, "prompt": [f"One {i}", f"Two {i}"]}, "read"


async def run_requests(client: httpx.AsyncClient, model: str, indices: range) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)

    async def one(i: int) -> None:
        path, body, behaviour = request_for(i, model)
        if behaviour == "read":
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"]
        elif behaviour == "cancel":
            try:
                await asyncio.wait_for(client.post(path, json=body), timeout=0.01)
            except TimeoutError:
                pass  # the client gave up while the server was generating
        else:
            async with client.stream("POST", path, json=body) as response:
                assert response.status_code == 200
                lines = sse_lines(response)
                if behaviour == "drop":
                    await anext(lines)
                    return  # leaving the block mid-stream closes the connection
                data = [line.removeprefix("data: ") async for line in lines if line.startswith("data: ")]
                assert data[-1] == "[DONE]" and not any('"error"' in d for d in data), data[-2:]
                if body.get("stream_options"):
                    assert json.loads(data[-2])["usage"]["completion_tokens"] >= 1

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def own_threads() -> int:
    """Threads other than the asyncio executors', which grow on demand up to a fixed bound."""
    return sum(1 for thread in threading.enumerate() if not thread.name.startswith("asyncio_"))


def server_tasks(server: LiveServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), server.loop).result(10)


def settled_tasks(server: LiveServer, at_most: int | None = None) -> int:
    """The server's task count once the connections a client just closed are wound down."""
    deadline = time.monotonic() + 10
    count = server_tasks(server)
    while time.monotonic() < deadline and (at_most is None or count > at_most):
        time.sleep(0.05)
        previous, count = count, server_tasks(server)
        if at_most is None and count == previous:
            break
    return count


def idle(server: LiveServer) -> None:
    """Wait until the engine, the admission queue and the HTTP layer have all let go of everything."""
    assert server.engine.wait_idle(30)
    deadline = time.monotonic() + 10
    while server.state.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = server.engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_pages_used) == (0, 0, 0)
    assert (server.state.admission.running, server.state.admission.queued) == (0, 0)
    assert not server.state.in_flight


async def test_soak_2000_mixed_requests_leak_nothing(http_server: LiveServer) -> None:
    def client() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=CONCURRENCY)
        return httpx.AsyncClient(base_url=http_server.base_url, timeout=60, limits=limits)

    began = time.monotonic()
    async with client() as warming:
        await run_requests(warming, http_server.model_name, range(WARM_UP))
    await asyncio.to_thread(idle, http_server)
    # Measured with no connection open, so keep-alive connections do not count as tasks.
    baseline = (await asyncio.to_thread(settled_tasks, http_server), own_threads(), rss_bytes())
    async with client() as soaking:
        await run_requests(soaking, http_server.model_name, range(WARM_UP, TOTAL))
    elapsed = time.monotonic() - began
    await asyncio.to_thread(idle, http_server)
    tasks = await asyncio.to_thread(settled_tasks, http_server, baseline[0])
    threads, rss = own_threads(), rss_bytes()
    assert tasks <= baseline[0], f"event-loop tasks grew from {baseline[0]} to {tasks}"
    assert threads <= baseline[1], f"threads grew from {baseline[1]} to {threads}"
    assert rss - baseline[2] < MAX_RSS_GROWTH, f"RSS grew by {(rss - baseline[2]) / 2**20:.0f} MiB"
    assert elapsed < 300, f"2,000 requests took {elapsed:.0f}s"
