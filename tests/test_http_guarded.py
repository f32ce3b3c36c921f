"""A server with every guard on: API keys, CORS for one origin, small admission limits, a request
timeout, a short shutdown timeout and the strict context length. Auth is checked against every route
in the app's URL map (a new route without auth fails here), overload only ever answers 200 or 503 with Retry-After, slow
requests end with a clear 408, and a shutdown aborts what outlives its timeout.

The last test shuts the server down, so it stays last in this file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving.cli import build_parser
from serving.client import body_lines
from serving.http.options import OptionError, from_arguments
from serving.http.settings import ServerSettings
from serving.request import InvalidRequestError
from tests.http_fixtures import LiveServer, _ThreadServer, async_openai_client, http, scrape, serve_in_thread
from tools.bench_serving import sse_lines

KEYS = ("key-a", "key-b")
ORIGIN = "http://ui.example"
MAX_RUNNING, MAX_QUEUED = 4, 8
REQUEST_TIMEOUT_S = 3.0
GUARDS = dict(
    api_keys=KEYS,
    allow_origins=(ORIGIN,),
    allow_credentials=True,
    max_concurrent_requests=MAX_RUNNING,
    max_queue_len=MAX_QUEUED,
    request_timeout=REQUEST_TIMEOUT_S,
    max_log_len=12,
    strict_context_length=True,
)
# The probes and the chat page's files (a browser opening a page sends no key); everything else needs one.
OPEN_PATHS = {"/health", "/v1/ready", "/chat", "/chat/chat.js", "/chat/chat.css"}
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def guarded(tiny_llama: Path) -> Iterator[tuple[LiveServer, _ThreadServer]]:
    with serve_in_thread(tiny_llama, shutdown_timeout=1.0, **GUARDS) as pair:
        yield pair


@pytest.fixture
def slow_steps(guarded: tuple[LiveServer, _ThreadServer]) -> Iterator[Callable[[float], None]]:
    """Make every engine step take at least `seconds` (a slow device), for the test's duration."""
    engine = guarded[0].engine

    def slow(seconds: float) -> None:
        engine.fault_hook = lambda chunks: time.sleep(seconds)

    yield slow
    engine.fault_hook = None


def completion(server: LiveServer, **fields: object) -> dict:
    return {"model": server.model_name, "prompt": "Once upon a time", "ignore_eos": True, **fields}


def sse_payloads(lines: list[str]) -> list[dict | str]:
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


# ---- API keys ----------------------------------------------------------------------------------


def test_every_route_in_the_url_map_needs_a_key(guarded: tuple[LiveServer, _ThreadServer]) -> None:
    server, _ = guarded
    rules = list(server.app.url_map.iter_rules())
    paths = {rule.rule for rule in rules}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/v1/models", "/metrics",
            "/openapi.json", "/"} <= paths  # fmt: skip
    refusals = (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": KEYS[0]},
    )
    for rule in rules:
        path = re.sub(r"<[^>]+>", "x", rule.rule)  # any value for a path variable
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            body = {} if method == "POST" else None
            for headers in refusals:
                response = http.request(method, server.base_url + path, json=body, headers=headers)
                if rule.rule in OPEN_PATHS:
                    assert response.status_code != 401, (method, path)
                    continue
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                error = response.json()["error"]
                if path.startswith("/v1/messages"):  # Anthropic's envelope on Anthropic's routes
                    assert error["type"] == "authentication_error" and "API key" in error["message"]
                else:
                    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
            if path.startswith("/v1/messages"):  # Anthropic's clients send the key as x-api-key
                assert http.request(method, server.base_url + path, json=body,
                                    headers={"x-api-key": KEYS[0]}).status_code != 401  # fmt: skip
                assert http.request(method, server.base_url + path, json=body,
                                    headers={"x-api-key": "wrong"}).status_code == 401  # fmt: skip
            for key in KEYS:
                for scheme in ("Bearer", "bearer"):
                    allowed = http.request(
                        method, server.base_url + path, json=body, headers={"Authorization": f"{scheme} {key}"}
                    )
                    assert allowed.status_code != 401, (method, path)
    # A path no route matches says nothing about what exists without a key.
    assert http.get(f"{server.base_url}/admin/secret").status_code == 401
    assert http.get(f"{server.base_url}/admin/secret", headers=AUTH).status_code == 404


def test_api_keys_from_a_file_or_the_environment_never_shown(tmp_path: Path) -> None:
    parser = build_parser()
    key_file = tmp_path / "keys"
    key_file.write_text("# keys for the gateway\nkey-one\n\n  key-two  \n")
    launch = from_arguments(
        parser.parse_args(["serve", "api_server", "--api-keys", "key-zero", "--api-key-file", str(key_file)]),
        environ={},
    )
    assert launch.settings.api_keys == ("key-zero", "key-one", "key-two")
    assert "key-one" not in repr(launch)
    from_environment = from_arguments(parser.parse_args(["serve", "api_server"]), environ={"XLSERVE_API_KEYS": "e1,e2"})
    assert from_environment.settings.api_keys == ("e1", "e2")
    key_file.write_text("# nothing but comments\n")
    with pytest.raises(OptionError, match="holds no API key"):
        from_arguments(parser.parse_args(["serve", "api_server", "--api-key-file", str(key_file)]), environ={})


# ---- CORS --------------------------------------------------------------------------------------


def test_cors_answers_the_listed_origin_only(guarded: tuple[LiveServer, _ThreadServer]) -> None:
    server, _ = guarded
    url = f"{server.base_url}/v1/completions"
    preflight = httpx.options(
        url,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200  # no key needed: browsers send none on a preflight
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    # The headers are on streams too, and browser code may read the request id.
    with http.stream("POST", url, json=completion(server, max_tokens=2, stream=True),
                     headers={"Origin": ORIGIN, **AUTH}) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in stream.headers["access-control-expose-headers"].lower()
        assert stream.read().endswith(b"data: [DONE]\n\n")
    # A 401 carries them as well, so a browser can show the reason.
    refused = http.get(f"{server.base_url}/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = http.get(f"{server.base_url}/v1/models", headers={"Origin": "http://elsewhere.example", **AUTH})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    with pytest.raises(InvalidRequestError, match="may not be"):
        ServerSettings(allow_origins=("*",), allow_credentials=True)


# ---- overload, timeouts ------------------------------------------------------------------------


async def test_overload_answers_200_or_503_with_retry_after_then_serves_normally(
    guarded: tuple[LiveServer, _ThreadServer],
) -> None:
    server, _ = guarded
    before = await asyncio.to_thread(scrape, server)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120, limits=limits) as client:

        async def one(i: int) -> tuple[int, httpx.Headers, object, int]:
            n = 1 + i % 2  # n counts as n slots
            body = completion(server, prompt=f"Request number {i}", max_tokens=4, n=n, stream=i % 3 == 0)
            if not body["stream"]:
                response = await client.post("/v1/completions", json=body)
                return response.status_code, response.headers, response.json(), n
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return response.status_code, response.headers, response.json(), n
                return 200, response.headers, sse_payloads([x async for x in sse_lines(response)]), n

        results = await asyncio.gather(*(one(i) for i in range(200)))
    statuses = Counter(status for status, *_ in results)
    # 408: admitted, but the request's 3 s ran out first (a CPU slowed by its neighbours): a clear error too; a
    # stream whose 3 s ran out after it began ends with that error as its last event instead.
    assert set(statuses) <= {200, 503, 408}, statuses
    assert statuses[200] >= MAX_RUNNING and statuses[503] > 0, statuses
    for status, headers, payload, n in results:
        if status == 408:
            assert payload["error"]["code"] == "request_timeout"
        elif status == 503:
            assert headers["retry-after"] == "1"
            assert payload["error"]["type"] == "server_error"
            assert payload["error"]["code"] in ("server_overloaded", "queue_timeout")
        elif isinstance(payload, list):  # a stream: every token, then [DONE]; or cut by its timeout
            events = payload[:-1]
            assert payload[-1] == "[DONE]"
            if events and "error" in events[-1]:
                assert events[-1]["error"]["code"] == "request_timeout", events[-1]
                assert not any("error" in p for p in events[:-1])
            else:
                assert not any("error" in p for p in events)
                assert sum(1 for p in events if p["choices"][0]["finish_reason"] == "length") == n
        else:
            assert payload["usage"]["completion_tokens"] == 4 * n
    after = await asyncio.to_thread(scrape, server)
    rejected = sum(after.get(f"xlserve:requests_rejected_total{{reason={r}}}", 0)
                   - before.get(f"xlserve:requests_rejected_total{{reason={r}}}", 0)
                   for r in ("server_overloaded", "queue_timeout"))
    assert rejected == statuses[503]
    assert (after["xlserve:admission_slots_running"], after["xlserve:admission_slots_queued"]) == (0, 0)
    # Then it serves normally; a request that could never fit the limit is a 400, not a 503.
    normal = await server.async_client().completions.create(model=server.model_name, prompt="ok", max_tokens=2)
    assert normal.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as too_big:
        await server.async_client().completions.create(model=server.model_name, prompt="x", n=MAX_RUNNING + 1)
    assert too_big.value.code == "too_many_choices" and too_big.value.param == "n"
    assert server.engine.wait_idle(30) and server.engine.stats().num_pages_used == 0


async def test_request_timeout_ends_slow_requests_with_a_clear_error(
    guarded: tuple[LiveServer, _ThreadServer], slow_steps: Callable[[float], None]
) -> None:
    server, _ = guarded
    slow_steps(0.1)  # 64 tokens would take over 6 s
    before = await asyncio.to_thread(scrape, server)
    # The SDK retries 408s unless told not to; with max_retries=2 a retried request would take 9 s.
    client = async_openai_client(f"{server.base_url}/v1", KEYS[0], max_retries=2)

    async def whole() -> float:
        began = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            await client.completions.create(model=server.model_name, prompt="Slowly", max_tokens=64,
                                            extra_body={"ignore_eos": True})
        assert raised.value.status_code == 408 and raised.value.code == "request_timeout"
        assert raised.value.response.headers["x-should-retry"] == "false"
        return time.monotonic() - began

    async def streamed() -> list[dict | str]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=30) as raw:
            body = completion(server, max_tokens=64, stream=True)
            async with raw.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                return sse_payloads([x async for x in sse_lines(response)])

    elapsed, events = await asyncio.gather(whole(), streamed())
    assert REQUEST_TIMEOUT_S <= elapsed < 2 * REQUEST_TIMEOUT_S
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
    assert any(e["choices"][0]["text"] for e in events[:-2])  # it streamed before it was cut
    assert await asyncio.to_thread(server.engine.wait_idle, 30)
    after = await asyncio.to_thread(scrape, server)
    key = "xlserve:request_errors_total{code=request_timeout}"
    assert after[key] - before.get(key, 0) == 2
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_streams_outlive_quarts_response_timeout(
    guarded: tuple[LiveServer, _ThreadServer], slow_steps: Callable[[float], None]
) -> None:
    server, _ = guarded
    server.app.config["RESPONSE_TIMEOUT"] = 0.3  # Quart's default is 60 s; a stream must not care
    slow_steps(0.02)
    try:
        body = completion(server, max_tokens=40, stream=True, stream_options={"include_usage": True})
        began = time.monotonic()
        with http.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
            events = sse_payloads(list(body_lines(r)))
        assert time.monotonic() - began > 0.3
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
    finally:
        server.app.config["RESPONSE_TIMEOUT"] = 60


def test_prompts_are_logged_cut_to_max_log_len_and_keys_never(
    guarded: tuple[LiveServer, _ThreadServer], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = guarded
    caplog.set_level(logging.INFO)
    prompt = "The quick brown fox jumps over the lazy dog"
    response = http.post(f"{server.base_url}/v1/completions", json=completion(server, prompt=prompt, max_tokens=2),
                         headers={**AUTH, "X-Request-Id": "log-test-1"})
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while not any("log-test-1" in r.getMessage() and r.name == "xlserve.access" for r in caplog.records):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [logged] = [r for r in caplog.records if r.name == "serving.http.choices" and "log-test-1" in r.getMessage()]
    record = json.loads(logged.getMessage().removeprefix("prompt "))
    tokenizer = server.engine.tokenizer
    assert record["prompt"] == tokenizer.decode(tokenizer.encode(prompt), skip_special_tokens=False)[:12]
    assert record["prompt_tokens"] == len(tokenizer.encode(prompt))
    for key in KEYS:
        assert not any(key in r.getMessage() for r in caplog.records)
        assert key not in repr(server.state.settings)


def test_strict_context_length_refuses_max_tokens_past_the_session(guarded: tuple[LiveServer, _ThreadServer]) -> None:
    server, _ = guarded
    room = server.engine.max_session_len - len(server.engine.tokenizer.encode("Once upon a time"))
    for path, extra in (("/v1/completions", {}), ("/generate", {"model": None})):
        refused = http.post(f"{server.base_url}{path}", json=completion(server, max_tokens=room + 1, **extra),
                            headers=AUTH, timeout=60)  # fmt: skip
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
        assert f"{room + 1} in the completion" in error["message"]
        # accepted (it may stop early at an EOS: the request's timeout is short)
        fits = http.post(f"{server.base_url}{path}", json=completion(server, max_tokens=room, ignore_eos=False,
                                                                     **extra), headers=AUTH, timeout=60)  # fmt: skip
        assert fits.status_code == 200, fits.text


# ---- last: shutting the server down ------------------------------------------------------------


def test_shutdown_aborts_requests_that_outlive_the_shutdown_timeout(
    guarded: tuple[LiveServer, _ThreadServer], slow_steps: Callable[[float], None]
) -> None:
    server, raw = guarded
    slow_steps(0.05)  # 100 tokens take 5 s, well past the 1 s shutdown timeout
    body = completion(server, max_tokens=100, stream=True)
    with http.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=30) as stream:
        lines = body_lines(stream)
        assert next(lines).startswith("data: {")  # generating
        stopping = threading.Thread(target=raw.stop)
        stopping.start()  # what SIGTERM does
        deadline = time.monotonic() + 5
        while http.get(f"{server.base_url}/v1/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = http.post(f"{server.base_url}/v1/completions", json=completion(server), headers=AUTH)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        assert http.get(f"{server.base_url}/health").status_code == 200  # alive while draining
        rest = sse_payloads(list(lines))
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "aborted"
    stopping.join(30)
    assert raw.exit_status == 0
