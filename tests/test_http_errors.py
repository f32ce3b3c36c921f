"""Malformed requests: each gets a 4xx with OpenAI's error body (never a 500, never a bare page), and the
server keeps answering normal requests afterwards."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.http_fixtures import MODEL_NAME, LiveServer, http, shared_http_server  # noqa: F401 (`http_server`)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"Content-Type": "application/json"}
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": USER, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL_NAME, "prompt": "hi", **fields}).encode()


# (name, method, path, body, headers, expected status, expected param or None)
MALFORMED: list[tuple[str, str, str, bytes | None, dict[str, str], int, str | None]] = [
    ("bad json", "POST", CHAT, b'{"model": ', JSON, 400, None),
    ("json array body", "POST", CHAT, b"[]", JSON, 400, None),
    ("json null body", "POST", COMPLETIONS, b"null", JSON, 400, None),
    ("not utf-8", "POST", COMPLETIONS, b'{"model": "\xff\xfe"}', JSON, 400, None),
    ("text/plain", "POST", CHAT, chat(), {"Content-Type": "text/plain"}, 400, None),
    (
        "form encoded",
        "POST",
        COMPLETIONS,
        b"model=x&prompt=y",
        {"Content-Type": "application/x-www-form-urlencoded"},
        400,
        None,
    ),
    ("missing model", "POST", CHAT, json.dumps({"messages": USER}).encode(), JSON, 400, "model"),
    ("missing messages", "POST", CHAT, json.dumps({"model": MODEL_NAME}).encode(), JSON, 400, "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), JSON, 400, "messages"),
    (
        "unknown role",
        "POST",
        CHAT,
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        JSON,
        400,
        "messages[0].role",
    ),
    (
        "content is a number",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        JSON,
        400,
        "messages[0].content",
    ),
    (
        "image content part",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
        JSON,
        400,
        "messages[0].content[0].type",
    ),
    ("messages as a string", "POST", CHAT, chat(messages="hi"), JSON, 400, "messages"),
    ("negative max_tokens", "POST", CHAT, chat(max_tokens=-1), JSON, 400, "max_tokens"),
    ("zero max_tokens", "POST", COMPLETIONS, completion(max_tokens=0), JSON, 400, "max_tokens"),
    ("max_tokens as a word", "POST", COMPLETIONS, completion(max_tokens="ten"), JSON, 400, "max_tokens"),
    ("max_tokens as a float", "POST", COMPLETIONS, completion(max_tokens=2.5), JSON, 400, "max_tokens"),
    ("n=0", "POST", CHAT, chat(n=0), JSON, 400, "n"),
    ("n too large", "POST", CHAT, chat(n=129), JSON, 400, "n"),
    ("temperature -1", "POST", CHAT, chat(temperature=-1), JSON, 400, "temperature"),
    ("temperature 3", "POST", COMPLETIONS, completion(temperature=3), JSON, 400, "temperature"),
    (
        "temperature NaN",
        "POST",
        COMPLETIONS,
        b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
        JSON,
        400,
        "temperature",
    ),
    ("top_p 2", "POST", CHAT, chat(top_p=2), JSON, 400, "top_p"),
    ("top_p 0", "POST", COMPLETIONS, completion(top_p=0), JSON, 400, "top_p"),
    ("top_k -2", "POST", COMPLETIONS, completion(top_k=-2), JSON, 400, "top_k"),
    ("min_p 1.5", "POST", COMPLETIONS, completion(min_p=1.5), JSON, 400, "min_p"),
    (
        "repetition_penalty 0",
        "POST",
        COMPLETIONS,
        completion(repetition_penalty=0),
        JSON,
        400,
        "repetition_penalty",
    ),
    ("negative seed", "POST", COMPLETIONS, completion(seed=-1), JSON, 400, "seed"),
    ("seed over 2**63", "POST", COMPLETIONS, completion(seed=2**64), JSON, 400, "seed"),
    ("stream as a string", "POST", CHAT, chat(stream="yes"), JSON, 400, "stream"),
    ("empty stop string", "POST", CHAT, chat(stop=""), JSON, 400, "stop"),
    ("too many stop strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(17)]), JSON, 400, "stop"),
    ("stop is a number", "POST", COMPLETIONS, completion(stop=5), JSON, 400, "stop"),
    (
        "stop token id out of vocabulary",
        "POST",
        COMPLETIONS,
        completion(stop_token_ids=[10**9]),
        JSON,
        400,
        "stop_token_ids",
    ),
    (  # the stop ids end the constraint's automaton, which is compiled before the engine sees the request
        "stop token id out of vocabulary, with a constraint",
        "POST",
        CHAT,
        chat(guided_regex="[a-z]+", stop_token_ids=[10**12]),
        JSON,
        400,
        "stop_token_ids",
    ),
    ("missing prompt", "POST", COMPLETIONS, json.dumps({"model": MODEL_NAME}).encode(), JSON, 400, "prompt"),
    ("empty prompt list", "POST", COMPLETIONS, completion(prompt=[]), JSON, 400, "prompt"),
    ("prompt is a number", "POST", COMPLETIONS, completion(prompt=5), JSON, 400, "prompt"),
    ("empty token-id prompt", "POST", COMPLETIONS, completion(prompt=[[]]), JSON, 400, "prompt[0]"),
    ("token id out of vocabulary", "POST", COMPLETIONS, completion(prompt=[1, 10**9]), JSON, 400, "prompt"),
    (
        "prompt over the session length",
        "POST",
        COMPLETIONS,
        completion(prompt="word " * 400),
        JSON,
        400,
        "prompt",
    ),
    (
        "chat over the session length",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "word " * 400}]),
        JSON,
        400,
        "messages",
    ),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=3), JSON, 400, "top_logprobs"),
    ("max_tokens 0 without echo", "POST", COMPLETIONS, completion(max_tokens=0), JSON, 400, "max_tokens"),
    ("best_of below n", "POST", COMPLETIONS, completion(best_of=1, n=2), JSON, 400, "best_of"),
    (
        "reserved chat_template_kwargs",
        "POST",
        CHAT,
        chat(chat_template_kwargs={"tokenize": True}),
        JSON,
        400,
        "chat_template_kwargs.tokenize",
    ),
    ("too many choices", "POST", COMPLETIONS, completion(prompt=["a"] * 20, n=8), JSON, 400, "n"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), JSON, 404, "model"),
    ("10 MB body", "POST", COMPLETIONS, completion(prompt="x" * 10_000_000), JSON, 413, None),
    ("GET on a POST route", "GET", CHAT, None, {}, 405, None),
    ("unknown route", "POST", "/v1/images/generations", completion(), JSON, 404, None),
]

CODES = {
    "unknown model": "model_not_found",
    "prompt over the session length": "context_length_exceeded",
    "chat over the session length": "context_length_exceeded",
}


@pytest.mark.parametrize(
    "name, method, path, body, headers, status, param", MALFORMED, ids=[case[0] for case in MALFORMED]
)
def test_malformed_request_gets_openai_error(
    http_server: LiveServer,
    name: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    param: str | None,
) -> None:
    response = http.request(method, http_server.base_url + path, content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if name in CODES:
        assert error["code"] == CODES[name]


def test_sdk_raises_with_the_error_fields(http_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        http_server.client().chat.completions.create(model=MODEL_NAME, messages=USER, n=0)
    assert raised.value.param == "n" and raised.value.type == "invalid_request_error"
    assert "n" in raised.value.message


def test_server_answers_normally_after_malformed_requests(http_server: LiveServer) -> None:
    client = http_server.client()
    assert client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=3).choices
    assert client.completions.create(model=MODEL_NAME, prompt="ok", max_tokens=3, stream=False).choices
    assert http_server.engine.wait_idle(30)
    assert http_server.engine.stats().num_pages_used == 0
