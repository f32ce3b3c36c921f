"""`serving.client.APIClient` against the shared live server: the LMDeploy guide's snippets run as
written there (only the import changed), and so does its curl example of /v1/chat/interactive."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import shutil
import subprocess
from urllib.parse import urlsplit

import httpx
import pytest

from serving.client import APIClient, APIClientError, body_lines
from tests.http_fixtures import LiveServer, shared_http_server  # noqa: F401 (`http_server`)

# lmdeploy-api-server-guide.zh.md, "使用 lmdeploy APIClient 接口", with `from serving.client import APIClient`.
GUIDE_CHAT_COMPLETIONS = """
from serving.client import APIClient
api_client = APIClient(f'http://{server_ip}:{server_port}')
model_name = api_client.available_models[0]
messages = [{"role": "user", "content": "Say this is a test!"}]
for item in api_client.chat_completions_v1(model=model_name, messages=messages):
    print(item)
"""
GUIDE_COMPLETIONS = """
from serving.client import APIClient
api_client = APIClient(f'http://{server_ip}:{server_port}')
model_name = api_client.available_models[0]
for item in api_client.completions_v1(model=model_name, prompt='hi'):
    print(item)
"""
GUIDE_INTERACTIVE = """
from serving.client import APIClient
api_client = APIClient(f'http://{server_ip}:{server_port}')
messages = [
    "hi, what's your name?",
    "who developed you?",
    "Tell me more about your developers",
    "Summarize the information we've talked so far"
]
for message in messages:
    for item in api_client.chat_interactive_v1(prompt=message,
                                               session_id=1,
                                               interactive_mode=True,
                                               stream=False):
        print(item)
"""
# "使用 cURL", 交互式对话 v1/chat/interactive: the body exactly as the guide sends it.
GUIDE_CURL_BODY = """{
    "prompt": "Hello! How are you?",
    "session_id": 1,
    "interactive_mode": true
  }"""


def run_snippet(snippet: str, server: LiveServer) -> list[dict]:
    """Run a guide snippet with its `server_ip`/`server_port`; returns what it printed, as dicts."""
    address = urlsplit(server.base_url)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {"server_ip": address.hostname, "server_port": address.port})
    # The snippets print dicts as Python writes them.
    return [ast.literal_eval(line) for line in printed.getvalue().splitlines()]


@pytest.fixture
def api_client(http_server: LiveServer):
    with APIClient(http_server.base_url) as client:
        yield client


def test_the_guides_chat_completions_snippet(http_server: LiveServer) -> None:
    [item] = run_snippet(GUIDE_CHAT_COMPLETIONS, http_server)
    assert item["object"] == "chat.completion" and item["model"] == http_server.model_name
    assert item["choices"][0]["finish_reason"] in ("stop", "length")
    assert item["usage"]["completion_tokens"] > 0


def test_the_guides_completions_snippet(http_server: LiveServer) -> None:
    [item] = run_snippet(GUIDE_COMPLETIONS, http_server)
    assert item["object"] == "text_completion"
    assert item["usage"]["completion_tokens"] <= 16  # the client's default max_tokens


def test_the_guides_interactive_snippet(http_server: LiveServer, api_client: APIClient) -> None:
    items = run_snippet(GUIDE_INTERACTIVE, http_server)
    try:
        assert len(items) == 4
        for item in items:
            assert set(item) >= {"text", "tokens", "input_tokens", "history_tokens", "finish_reason"}
            assert min(item["tokens"], item["input_tokens"], item["history_tokens"]) >= 0
        # No length given: the first answer may fill the session; the turns after it then say so.
        history = 0
        for item in items:
            assert item["history_tokens"] == history
            if item["tokens"] == 0:
                assert item["finish_reason"] == "length" and "is full" in item["message"]
            else:
                history += item["input_tokens"] + item["tokens"]
    finally:
        api_client.end_session(1)


def test_the_guides_curl_example(http_server: LiveServer, api_client: APIClient) -> None:
    assert shutil.which("curl"), "curl is a test requirement (.ci/run installs it where it is missing)"
    command = ["curl", "-sS", f"{http_server.base_url}/v1/chat/interactive",
               "-H", "Content-Type: application/json", "-d", GUIDE_CURL_BODY]  # fmt: skip
    answer = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout)
    try:
        assert answer["history_tokens"] == 0 and answer["input_tokens"] > 0 and answer["tokens"] > 0
        assert answer["finish_reason"] in ("stop", "length")
    finally:
        assert api_client.end_session(1)["history_tokens"] == answer["input_tokens"] + answer["tokens"]


def test_streams_yield_one_dict_per_chunk(http_server: LiveServer, api_client: APIClient) -> None:
    model = http_server.model_name
    chunks = list(api_client.chat_completions_v1(model, "Count to three", max_tokens=4, stream=True,
                                                 temperature=0))  # fmt: skip
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    [whole] = api_client.chat_completions_v1(model, "Count to three", max_tokens=4, temperature=0)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    pieces = list(api_client.completions_v1(model, "Once", max_tokens=3, stream=True, ignore_eos=True, temperature=0))
    # One chunk per token at most (a handler that fell behind the engine merges a step's tokens), then the
    # finish_reason in a chunk of empty text.
    assert 1 <= len(pieces) - 1 <= 3 and pieces[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                                                       "finish_reason": "length"}  # fmt: skip
    [whole_completion] = api_client.completions_v1(model, "Once", max_tokens=3, ignore_eos=True, temperature=0)
    assert "".join(p["choices"][0]["text"] for p in pieces) == whole_completion["choices"][0]["text"]
    lines = list(api_client.chat_interactive_v1("Hi", stream=True, request_output_len=3, ignore_eos=True))
    counts = [line["tokens"] for line in lines]  # running totals (tokens of one engine step may share a line)
    assert counts == sorted(set(counts)) and counts[-1] == 3
    assert lines[-1]["finish_reason"] == "length"


def test_chat_keeps_the_session_and_errors_are_yielded(http_server: LiveServer, api_client: APIClient) -> None:
    [(text, tokens, reason)] = api_client.chat("Hello", session_id=5, request_output_len=2, ignore_eos=True)
    assert tokens == 2 and reason == "length" and isinstance(text, str)
    [(_, _, reason)] = api_client.chat("Again", session_id=5, request_output_len=1)
    assert api_client.end_session(5)["history_tokens"] > 2
    [refused] = api_client.chat_interactive_v1("hi", adapter_name="lora")
    assert refused["error"]["param"] == "adapter_name"
    with APIClient(http_server.base_url, raise_errors=True) as raising:
        with pytest.raises(APIClientError) as unknown:
            list(raising.completions_v1("no-such-model", "hi"))
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"


def test_body_lines_split_only_at_newlines() -> None:
    # A model's text may hold U+2028 or U+0085, which JSON written with ensure_ascii=False carries raw;
    # str.splitlines (httpx's iter_lines) would cut such a line in two.
    text = json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False)
    response = httpx.Response(200, content=(text + "\r\n" + text + "\n" + text).encode())
    assert [json.loads(line) for line in body_lines(response)] == [{"text": "a\u2028b\x85c"}] * 3
