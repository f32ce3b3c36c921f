"""The two ways to start a server, each as its own process on the built-in demo model:
`hypercorn serving.app:app` configured only by XLSERVE_* variables, and `xlserve serve api_server`
(including its graceful shutdown on SIGTERM and its start-up lines when no terminal is attached). Plus the
CLI's refusals and help, which need no server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import signal
import sys

import httpx
import openai
import pytest

from serving.cli import main
from serving.http.options import OPTIONS
from tests.http_fixtures import (
    SMALL_BUCKET_FLAGS,
    ServerProcess,
    all_compiled,
    console_script,
    free_port,
    http,
    openai_client,
)
from tools.bench_serving import sse_lines


def flags_as_environment(flags: list[str]) -> dict[str, str]:
    """`--session-len 128 --decode-batch-buckets 1 4` → XLSERVE_SESSION_LEN=128,
    XLSERVE_DECODE_BATCH_BUCKETS=1,4."""
    env: dict[str, str] = {}
    name = ""
    for item in flags:
        if item.startswith("--"):
            name = "XLSERVE_" + item[2:].upper().replace("-", "_")
            env[name] = ""
        else:
            env[name] = f"{env[name]},{item}" if env[name] else item
    return env


def test_hypercorn_app_configured_by_environment_only() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **flags_as_environment(SMALL_BUCKET_FLAGS),
        "XLSERVE_MODEL": "",  # unset: the built-in demo model
        "XLSERVE_MODEL_NAME": "demo",
        "XLSERVE_API_KEYS": "key-one,key-two",
        "XLSERVE_PUBLIC_METRICS": "true",
    }
    server = ServerProcess([sys.executable, "-m", "hypercorn", "serving.app:app", "--bind", f"127.0.0.1:{port}"], env)
    try:
        # While the buckets compile the process is live but not ready, and refuses generation.
        server.wait_until(lambda: http.get(f"{base}/health", timeout=5).status_code == 200)
        not_ready = http.get(f"{base}/v1/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "model_not_ready"
        early = http.post(
            f"{base}/v1/completions",
            json={"model": "demo", "prompt": "x"},
            headers={"Authorization": "Bearer key-one"},
        )
        assert early.status_code == 503
        server.wait_ready(base)
        # Probes are open; everything else needs a key.
        assert http.get(f"{base}/health").status_code == 200
        unauthorised = http.get(f"{base}/v1/models")
        assert unauthorised.status_code == 401 and unauthorised.headers["www-authenticate"] == "Bearer"
        assert unauthorised.json()["error"]["code"] == "invalid_api_key"
        assert http.get(f"{base}/openapi.json", headers={"Authorization": "Bearer nope"}).status_code == 401
        metrics = http.get(f"{base}/metrics")  # --public-metrics: a scraper needs no key
        assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
        with pytest.raises(openai.AuthenticationError):
            openai_client(f"{base}/v1", "wrong", max_retries=0).models.list()

        client = openai_client(f"{base}/v1", "key-two", max_retries=0)
        [model] = client.models.list().data
        assert (model.id, model.model_extra["max_model_len"]) == ("demo", 128)
        chat = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=2
        )
        streamed = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=2, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.output()


def test_installed_xlserve_command_serves_the_demo_outside_the_checkout_and_drains_on_sigterm(tmp_path) -> None:
    """The console script as a user runs it after `pip install`: from a folder that is not the checkout
    (so the repo root is not on sys.path) and beside Hugging Face's `kernels`, which transformers installs
    and whose top-level name once shadowed ours."""
    assert "site-packages" in importlib.util.find_spec("kernels").origin  # the neighbour is really there
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        console_script("xlserve"),
        "serve",
        "api_server",
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
        "--allow-origins",
        "http://ui.example",
        *SMALL_BUCKET_FLAGS,
        # Two sequences decode at a time, so the drain's ten 100-token streams outlast its checks.
        "--max-batch-size",
        "2",
        "--shutdown-timeout",
        "120",
    ]
    server = ServerProcess(command, env={"PYTHONPATH": None}, cwd=tmp_path)
    try:
        server.wait_ready(base)
        client = openai_client(f"{base}/v1", "none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["xlserve-demo"]
        chat = client.chat.completions.create(
            model="xlserve-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        completion = client.completions.create(
            model="xlserve-demo", prompt="hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert completion.usage.completion_tokens == 4
        # CORS: the allowed origin is answered, on preflights and on the answer itself.
        preflight = httpx.options(
            f"{base}/v1/completions",
            headers={
                "Origin": "http://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        answer = http.get(f"{base}/v1/models", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in answer.headers
        server.wait_until(lambda: all_compiled(server.output().encode()))  # the CLI says when it is ready
        check_plain_start_up_lines(server.output())

        # Graceful shutdown (one process start serves both tests: each costs a compile on CI).
        for lines in asyncio.run(sigterm_during_ten_streams(server, base)):
            payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            assert payloads[-1] == "[DONE]"
            chunks = [json.loads(p) for p in payloads[:-1]]
            assert not any("error" in c for c in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # ran to the end, not aborted
        status = server.process.wait(60)
    finally:
        server.stop()
    assert status == 0, server.output()


def check_plain_start_up_lines(output: str) -> None:
    """Not on a terminal, start-up progress is plain lines (no bars): the weights in tenths, one line per
    bucket with its time, then the summary."""
    assert "\r" not in output and "|" not in output, "bars were drawn where no terminal is"
    loaded = re.findall(r"^xlserve: loaded (\d+)/(\d+) tensors, [\d.]+ GiB of [\d.]+ GiB$", output, re.M)
    assert loaded and loaded[-1][0] == loaded[-1][1]
    buckets = re.findall(r"^xlserve: compiled bucket (\d+)/(\d+) \[[^]]+\][^\n]* in [\d.]+s$", output, re.M)
    total = int(buckets[-1][1])
    assert [int(done) for done, _ in buckets] == list(range(1, total + 1))
    summary = re.search(r"^xlserve: xlserve-demo ready after [\d.]+s: float32, TP 1, (\d+) KV pages of 16 tokens "
                        rf"\((\d+) tokens\), (\d+ of {total} buckets compiled \(the rest compile while it serves\)|"
                        rf"{total} buckets compiled in [\d.]+s); OpenAI API at .*/v1, "
                        r"chat at .*/chat, Swagger UI at .*/$", output, re.M)
    assert summary, output
    assert int(summary[1]) * 16 == int(summary[2])


async def sigterm_during_ten_streams(server: ServerProcess, base: str) -> list[list[str]]:
    """Start ten streams, SIGTERM the server while they run, check that readiness turns false and new
    requests get 503; returns each stream's lines."""
    body = {
        "model": "xlserve-demo",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 100,
        "ignore_eos": True,
        "stream": True,
    }
    opened: list[int] = []
    all_open = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def stream() -> list[str]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                lines = sse_lines(response)
                received = [await anext(lines)]  # the first chunk: the stream is under way
                opened.append(1)
                if len(opened) == 10:
                    all_open.set()
                return received + [line async for line in lines]

        streams = [asyncio.create_task(stream()) for _ in range(10)]
        await asyncio.wait_for(all_open.wait(), 60)
        server.process.send_signal(signal.SIGTERM)
        while (await client.get("/v1/ready")).status_code != 503:  # readiness turns false first
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/completions", json={"model": "xlserve-demo", "prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        return await asyncio.gather(*streams)


def test_a_model_that_fails_to_load_exits_1(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "api_server", str(tmp_path)]) == 1  # a directory, but no checkpoint in it
    assert "cannot load the model" in capsys.readouterr().err


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "api_server", "-h"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option.flag in text, f"{option.flag} is missing from -h"
    assert "23333" in text and "0.0.0.0" in text
    # A default that lives in the engine's config is named in the flag's own help, never as the parser's None.
    assert "(default: None)" not in text
    assert "float32 (default: auto)" in " ".join(text.split())  # --dtype


def test_every_engine_option_has_a_flag() -> None:
    import dataclasses

    from serving.engine.config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"extra"}
    assert fields == {o.field for o in OPTIONS if o.target == "engine"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--revision", "main"], "--revision applies to a hub id MODEL; none was given"),
        (["--download-dir", "/tmp/x"], "--download-dir applies to a hub id MODEL; none was given"),
        (["--proxy-url", "proxy:8000"], "--proxy-url must be an http"),
        (["--backend", "pytorch"], "invalid choice"),
        (["--cache-block-seq-len", "48"], "--cache-block-seq-len"),
        (["--server-port", "http"], "invalid int value"),
        (["--allow-origins", "*", "--allow-credentials"], "may not be * when credentials are allowed"),
        (["--max-queue-len", "-1"], "--max-queue-len"),
        (["--api-key-file", "/no/such/keys"], "cannot read"),
    ],
)
def test_cli_refuses_clearly(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "api_server", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_bare_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out
