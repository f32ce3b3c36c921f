"""On-demand profiling (`--profile-dir`): without the flag POST /start_profile and /stop_profile are 404;
with it, a trace of a live completion is written under the directory, misuse is a 409 in OpenAI's error
body that leaves the server serving, and the API key guards both routes.

The JAX profiler is one per process and these servers run in the test process, so every test that
starts a trace stops it in a `finally`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.cli import build_parser
from serving.http.options import from_arguments, from_environment
from tests.http_fixtures import LiveServer, http, serve_in_thread, shared_http_server  # noqa: F401 (`http_server`)

KEY = "profile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROUTES = ("/start_profile", "/stop_profile")


@pytest.fixture(scope="module")
def profiled(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    directory = tmp_path_factory.mktemp("profiles")
    with serve_in_thread(tiny_llama, api_keys=(KEY,), profile_dir=str(directory)) as (server, _):
        yield server, directory


def post(server: LiveServer, path: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    # Writing a trace takes a few seconds on a busy 2-core machine.
    return http.post(server.base_url + path, headers=headers, timeout=120)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", code)


def test_the_flag_and_its_variable_set_the_directory() -> None:
    launch = from_arguments(build_parser().parse_args(["serve", "api_server", "--profile-dir", "traces"]), environ={})
    assert launch.settings.profile_dir == "traces"
    assert from_environment({"XLSERVE_PROFILE_DIR": "traces"}).settings.profile_dir == "traces"
    assert from_environment({}).settings.profile_dir is None


def test_without_the_flag_the_routes_are_404(http_server: LiveServer) -> None:
    for path in ROUTES:
        assert_error(http.post(http_server.base_url + path), 404, "not_found")
    assert not set(ROUTES) & set(http.get(f"{http_server.base_url}/openapi.json").json()["paths"])


def test_a_trace_of_a_completion_is_written(profiled: tuple[LiveServer, Path]) -> None:
    server, directory = profiled
    started = post(server, "/start_profile")
    try:
        assert started.status_code == 200, started.text
        assert started.json() == {"status": "started", "dir": str(directory)}
        completion = server.client().completions.create(
            model=server.model_name, prompt="Once upon a time", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert completion.usage.completion_tokens == 4
    finally:
        stopped = post(server, "/stop_profile")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {"status": "stopped", "dir": str(directory)}
    traces = [*directory.rglob("*.xplane.pb"), *directory.rglob("*trace.json.gz")]
    assert traces and all(trace.stat().st_size > 0 for trace in traces)


async def test_misuse_is_a_409_and_the_server_goes_on(profiled: tuple[LiveServer, Path]) -> None:
    server, _ = profiled
    assert_error(post(server, "/stop_profile"), 409, "profile_not_running")
    async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
        # Two starts at once: exactly one trace begins.
        both = await asyncio.gather(client.post("/start_profile"), client.post("/start_profile"))
    try:
        assert sorted(r.status_code for r in both) == [200, 409]
        assert_error(next(r for r in both if r.status_code == 409), 409, "profile_already_running")
        assert_error(post(server, "/start_profile"), 409, "profile_already_running")
    finally:
        assert post(server, "/stop_profile").status_code == 200
    assert_error(post(server, "/stop_profile"), 409, "profile_not_running")
    completion = server.client().completions.create(model=server.model_name, prompt="Hello", max_tokens=2)
    assert completion.choices[0].finish_reason in ("length", "stop")


def test_the_routes_need_the_api_key_and_are_documented(profiled: tuple[LiveServer, Path]) -> None:
    from openapi_spec_validator import validate

    server, _ = profiled
    for path in ROUTES:
        assert_error(post(server, path, headers={}), 401, "invalid_api_key")
    # The refused start started nothing.
    assert_error(post(server, "/stop_profile"), 409, "profile_not_running")
    spec = http.get(f"{server.base_url}/openapi.json", headers=AUTH).json()
    validate(spec)
    for path in ROUTES:
        assert {"200", "409"} <= set(spec["paths"][path]["post"]["responses"])
