"""One `xlserve` process tried as an attacker and as an unlucky operator would (issue 23): its engine child
stopped (SIGSTOP stands in for a hung device or a deadlock) and killed under streams, queued requests and
sessions; prompts of megabytes; keep-alive connections after refusals; OPTIONS and WebSocket without a
key; template variables and fields the server cannot honour; a shutdown under a stalled upload.

The server is real (its own process, its engine in a child process, API keys, small admission limits),
so signals reach the real engine child and the server's log shows every traceback. One process serves
the whole module: the tests run in file order, and the last ones stop then kill its engine and shut it
down, so they stay last.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.http_fixtures import SMALL_BUCKET_FLAGS, ServerProcess, console_script, free_port, http
from tools.bench_serving import sse_lines

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
STALL_TIMEOUT_S = 3.0
SHUTDOWN_TIMEOUT_S = 3.0
MAX_RUNNING, MAX_QUEUED = 2, 3
PROBE_LATENCY_S = 0.1  # the most a probe may take while the engine is stopped


class Server:
    def __init__(self, process: ServerProcess, port: int):
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self.port = port

    def engine_pids(self) -> list[int]:
        """The children started by multiprocessing's spawn (not its resource tracker): the engine's."""
        pid = self.process.process.pid
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):
            children += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def engine_pid(self) -> int:
        [engine] = self.engine_pids()
        return engine

    def memory_kib(self, field: str) -> int:
        """`VmRSS` or `VmHWM` (the peak) of the server process, in KiB (the engine child is apart)."""
        for line in Path(f"/proc/{self.process.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/pid/status")

    def assert_no_traceback(self) -> None:
        output = self.process.output()
        assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[Server]:
    port = free_port()
    command = [
        console_script("xlserve"), "serve", "api_server", str(tiny_llama), "--model-name", MODEL,
        "--server-name", "127.0.0.1", "--server-port", str(port), *SMALL_BUCKET_FLAGS,
        "--max-concurrent-requests", str(MAX_RUNNING), "--max-queue-len", str(MAX_QUEUED),
        "--engine-stall-timeout", str(STALL_TIMEOUT_S), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
    ]  # fmt: skip
    process = ServerProcess(command, env={"XLSERVE_API_KEYS": KEY})
    live = Server(process, port)
    try:
        process.wait_ready(live.base)
        yield live
    finally:
        if process.process.poll() is None:
            for engine in live.engine_pids():
                os.kill(engine, signal.SIGCONT)  # in case a failed test left it stopped
        process.stop()


def async_client(server: Server) -> httpx.AsyncClient:
    # Idle connections are dropped before Hypercorn's keep-alive timeout (5 s) could close one under a
    # request: the tests wait seconds between requests.
    return httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=60,
                             limits=httpx.Limits(keepalive_expiry=1.0))


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, **fields}


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


# ---- requests the server cannot honour: 400s naming the field ---------------------------------------


@pytest.mark.parametrize("name, value", [
    ("documents", 5), ("conversation", 5), ("return_dict", True), ("padding", "max_length"), ("max_length", 3),
    ("tokenize", True), ("tokenizer_kwargs", {}), ("messages", []), ("raise_exception", 1), ("range", 1),
    ("not-a-name", 1),
])  # fmt: skip
def test_chat_template_kwargs_that_are_not_template_variables_are_400s(server: Server, name: str, value: Any) -> None:
    response = http.post(f"{server.base}/v1/chat/completions", json=chat(chat_template_kwargs={name: value}),
                         headers=AUTH)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (f"chat_template_kwargs.{name}", "invalid_template_variable")


def test_template_variables_reach_the_template_and_ill_typed_ones_are_400s(server: Server) -> None:
    url = f"{server.base}/v1/chat/completions"
    assert http.post(url, json=chat(chat_template_kwargs={"enable_thinking": False}), headers=AUTH).status_code == 200
    # The template writes `bos_token + '[INST] '`: a number there fails the rendering, the client's 400.
    ill_typed = http.post(url, json=chat(chat_template_kwargs={"bos_token": 5}), headers=AUTH)
    assert ill_typed.status_code == 400
    assert error_of(ill_typed)["param"] == "chat_template_kwargs"
    server.assert_no_traceback()


@pytest.mark.parametrize("route, field, value", [
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "modalities", ["text", "audio"]),
    ("completions", "prompt_logprobs", 1),
])  # fmt: skip
def test_fields_that_change_a_requests_meaning_are_refused_not_ignored(server: Server, route: str, field: str,
                                                                        value: Any) -> None:
    body = chat(**{field: value}) if route == "chat" else completion(max_tokens=1, **{field: value})
    response = http.post(f"{server.base}/v1/{'chat/completions' if route == 'chat' else 'completions'}", json=body,
                         headers=AUTH)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == field and "does not support" in error["message"]


def test_values_that_change_nothing_and_unknown_fields_are_accepted(server: Server) -> None:
    harmless = dict(logit_bias={}, response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0.0,
                    functions=None, modalities=["text"], min_tokens=0, some_future_field={"x": 1})
    response = http.post(f"{server.base}/v1/chat/completions", json=chat(**harmless), headers=AUTH)
    assert response.status_code == 200, response.text


# ---- connections, methods and upgrades without a key ---------------------------------------------


def test_keep_alive_connections_survive_answers_sent_before_the_body_was_read(server: Server) -> None:
    """401 (no key) and 405 (a POST to a GET route) are answered before the body is read; on a kept-alive
    connection the next request must not be lost (once 1-2 % were: the server closed under it)."""
    statuses: Counter[int | str] = Counter()
    body = {"model": MODEL, "prompt": "x" * 4000}
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for i in range(1000):
            try:
                if i % 2:
                    response = client.post("/v1/completions", json=body)
                else:
                    response = client.post("/v1/models", json=body, headers=AUTH)
                statuses[response.status_code] += 1
            except httpx.TransportError as error:
                statuses[type(error).__name__] += 1
    assert statuses == {401: 500, 405: 500}


def websocket_upgrade(server: Server, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A WebSocket handshake on a raw socket: the status and JSON body of the server's HTTP answer."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_options_and_websocket_upgrades_need_a_key(server: Server) -> None:
    for path in ("/v1/completions", "/metrics", "/no/such/route"):
        response = httpx.options(server.base + path)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key", path
        # CORS is off: what looks like a preflight is no exception.
        preflight = httpx.options(server.base + path, headers={"Origin": "http://ui.example",
                                                               "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 401, path
    assert httpx.options(f"{server.base}/v1/completions", headers=AUTH).status_code == 200
    for path in ("/v1/completions", "/v1/models", "/no/such/route"):
        status, body = websocket_upgrade(server, path, {})
        assert (status, body["error"]["code"]) == (401, "invalid_api_key"), path
        status, body = websocket_upgrade(server, path, AUTH)
        assert (status, body["error"]["code"]) == (400, "websocket_not_supported"), path


# ---- work before admission -------------------------------------------------------------------------


async def test_twelve_prompts_of_four_megabytes_leave_a_normal_request_fast(server: Server) -> None:
    """Each is refused (400, or 503 when too many wait) without tokenizing it whole, on a pool of its own,
    so a two-token completion sent among them is answered in under a second, and the server's memory
    grows by less than 256 MiB (it rose by 1.4 GB when each was tokenized)."""
    huge = "Once upon a time there was a fox. " * 114_000  # 3.9 MB
    rss_before, peak_before = server.memory_kib("VmRSS"), server.memory_kib("VmHWM")
    async with async_client(server) as client:

        async def huge_request(i: int) -> httpx.Response:
            if i % 2:
                return await client.post("/v1/completions", json=completion(prompt=huge))
            return await client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": huge}]))

        floods = [asyncio.create_task(huge_request(i)) for i in range(12)]
        await asyncio.sleep(0.05)  # the uploads are under way
        began = time.monotonic()
        normal = await client.post("/v1/completions", json=completion(max_tokens=2))
        latency = time.monotonic() - began
        answers = await asyncio.gather(*floods)
    assert normal.status_code == 200 and latency < 1.0, (normal.text, latency)
    for answer in answers:
        assert answer.status_code in (400, 503), answer.text
        code = error_of(answer)["code"]
        assert code == ("context_length_exceeded" if answer.status_code == 400 else "server_overloaded")
    assert sum(a.status_code == 400 for a in answers) >= 6
    grown_mib = (server.memory_kib("VmRSS") - rss_before) / 1024
    peak_mib = (server.memory_kib("VmHWM") - max(peak_before, rss_before)) / 1024
    assert grown_mib < 256 and peak_mib < 256, (grown_mib, peak_mib)


# ---- the engine stopped, then killed (these stay last but one) -------------------------------------


async def stream_until_first_chunk(client: httpx.AsyncClient, body: dict[str, Any]) -> asyncio.Task[list[str]]:
    """Start a stream; returns its task (all its lines) once the first chunk has come."""
    started = asyncio.Event()

    async def run() -> list[str]:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = []
            async for line in sse_lines(response):
                if line:
                    lines.append(line)
                    started.set()
            return lines

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 60)
    return task


def sse_payloads(lines: list[str]) -> list[Any]:
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


async def wait_for_admission(client: httpx.AsyncClient, running: int, queued: int) -> None:
    """Until admission has `running` slots taken and `queued` waiting (a scrape never waits for the engine)."""
    want = [f'xlserve:admission_slots_running{{model_name="{MODEL}"}} {float(running)}',
            f'xlserve:admission_slots_queued{{model_name="{MODEL}"}} {float(queued)}']
    deadline = time.monotonic() + 10
    while True:
        text = (await client.get("/metrics")).text
        if all(line in text for line in want):
            return
        assert time.monotonic() < deadline, f"admission never held {running} running, {queued} queued:\n{text}"
        await asyncio.sleep(0.02)


async def test_a_stopped_engine_is_found_stuck_and_its_requests_fail_retryably(server: Server) -> None:
    """SIGSTOP the engine child under a stream, an interactive turn and three queued requests: the probes
    and metrics keep answering at once; after --engine-stall-timeout both probes say `engine_stalled`,
    every request gets a 503 it may retry (the stream an error event), and new ones too; once the engine
    runs again the server serves again."""
    engine = server.engine_pid()
    async with async_client(server) as client:
        stream = await stream_until_first_chunk(client, completion())
        os.kill(engine, signal.SIGSTOP)
        try:
            await stalled_under_load(client, stream, time.monotonic())
        finally:
            os.kill(engine, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while (await client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "the server did not notice the engine move again"
            await asyncio.sleep(0.05)
        served = await client.post("/v1/completions", json=completion(max_tokens=3))
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3
    server.assert_no_traceback()


async def stalled_under_load(client: httpx.AsyncClient, stream: asyncio.Task[list[str]], stopped: float) -> None:
    """The stopped-engine test while the engine is stopped (since `stopped`)."""
    turn = asyncio.create_task(client.post("/v1/chat/interactive", json={
        "prompt": "hi", "session_id": 11, "interactive_mode": True, "request_output_len": 50}))  # fmt: skip
    await wait_for_admission(client, running=2, queued=0)
    queued = [asyncio.create_task(client.post("/v1/completions", json=completion())) for _ in range(3)]
    await wait_for_admission(client, running=2, queued=3)
    latencies = []
    while True:  # probes and metrics answer at once while the engine is stopped, then say so
        began = time.monotonic()
        health = await client.get("/health")
        latencies.append(time.monotonic() - began)
        if health.status_code != 200:
            break
        began = time.monotonic()
        assert (await client.get("/metrics")).status_code == 200
        latencies.append(time.monotonic() - began)
        assert time.monotonic() - stopped < STALL_TIMEOUT_S + 5, "the stall was not noticed"
        await asyncio.sleep(0.05)
    noticed = time.monotonic() - stopped
    assert max(latencies) < PROBE_LATENCY_S and STALL_TIMEOUT_S <= noticed < STALL_TIMEOUT_S + 2, (
        max(latencies), noticed)
    assert health.status_code == 503 and error_of(health)["code"] == "engine_stalled"
    ready = await client.get("/v1/ready")
    assert ready.status_code == 503 and error_of(ready)["code"] == "engine_stalled"
    payloads = sse_payloads(await stream)
    assert payloads[-1] == "[DONE]" and payloads[-2]["error"]["code"] == "engine_stalled"
    for answer in [await turn, *await asyncio.gather(*queued)]:
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
        assert error_of(answer)["code"] == "engine_stalled"
    refused = await client.post("/v1/completions", json=completion())
    assert refused.status_code == 503 and error_of(refused)["code"] == "engine_stalled"
    for _ in range(20):  # a probe stays fast however long the engine stays stopped
        began = time.monotonic()
        await client.get("/health")
        assert time.monotonic() - began < PROBE_LATENCY_S


async def test_a_killed_engine_fails_running_requests_and_refuses_queued_ones(server: Server) -> None:
    """SIGKILL the engine child (frozen first, so what runs and what waits is certain): running requests get
    500 `engine_error` (the stream an error event), queued ones 503 `engine_stopped` with Retry-After, a
    session can still be ended (200), both probes say so, and the log has no traceback."""
    engine = server.engine_pid()
    async with async_client(server) as client:
        session = {"prompt": "hi", "session_id": 12, "interactive_mode": True, "request_output_len": 3}
        assert (await client.post("/v1/chat/interactive", json=session)).status_code == 200
        stream = await stream_until_first_chunk(client, completion())
        os.kill(engine, signal.SIGSTOP)
        try:
            running = asyncio.create_task(client.post("/v1/completions", json=completion()))
            await wait_for_admission(client, running=2, queued=0)
            queued = [asyncio.create_task(client.post("/v1/completions", json=completion())) for _ in range(3)]
            await wait_for_admission(client, running=2, queued=3)
        finally:
            os.kill(engine, signal.SIGKILL)

        payloads = sse_payloads(await stream)
        assert payloads[-1] == "[DONE]" and payloads[-2]["error"]["code"] == "engine_error"
        failed = await running
        assert failed.status_code == 500 and error_of(failed)["code"] == "engine_error"
        for answer in await asyncio.gather(*queued):
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
            assert error_of(answer)["code"] == "engine_stopped"
        ended = await client.post("/v1/chat/interactive", json={**session, "interactive_mode": False, "prompt": "",
                                                                 "request_output_len": 0})
        assert ended.status_code == 200 and ended.json()["history_tokens"] > 0
        refused = await client.post("/v1/completions", json=completion())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert error_of(refused)["code"] == "engine_stopped"
        for probe in ("/health", "/v1/ready"):
            answer = await client.get(probe)
            assert answer.status_code == 503 and error_of(answer)["code"] == "engine_stopped", probe
        assert (await client.get("/metrics")).status_code == 200
    server.assert_no_traceback()


# ---- shutdown (last: it ends the server) -------------------------------------------------------------


def test_a_stalled_upload_does_not_hold_the_shutdown_open(server: Server) -> None:
    """A client that sends headers and half a body, then nothing: SIGTERM refuses it at once with a 503
    in OpenAI's envelope, and the server exits well within --shutdown-timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"model": ')
        time.sleep(0.3)  # the request is in, its body unfinished
        began = time.monotonic()
        server.process.process.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        answered = time.monotonic() - began
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "server_shutting_down"
    status = server.process.process.wait(SHUTDOWN_TIMEOUT_S + 10)
    exited = time.monotonic() - began
    assert answered < 1.0 and exited < SHUTDOWN_TIMEOUT_S + 1, (answered, exited)
    assert status == 0
