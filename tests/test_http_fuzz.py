"""Hostile input against the shared server: schemathesis fuzzes every operation of our own
/openapi.json (no 5xx, answers conform to the documented statuses, content types and schemas,
invalid data is refused), and a hand-written table of hostile requests (huge, deep, out of range,
injection-shaped) each gets a 4xx in OpenAI's error format. Nothing takes the server down: it
answers normally afterwards.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.http_fixtures import MODEL_NAME, LiveServer, http, shared_http_server  # noqa: F401 (`http_server`)

pytestmark = pytest.mark.slow  # the long tier: `pytest -m "not slow"` leaves it out

# Every operation of /openapi.json; a new route must be added here, so it is fuzzed too.
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/ready"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/chat/interactive"),
    ("POST", "/v1/encode"),
    ("POST", "/generate"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
]
EXAMPLES = 25  # per operation and mode: each generates text on a 2-core CI machine
FUZZ_MAX_TOKENS = 4


@pytest.fixture(scope="module")
def api_schema(http_server: LiveServer) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{http_server.base_url}/openapi.json")
    # Invalid data may come as a body over --max-request-bytes, which the server refuses with 413 before
    # reading it (as it must: "5 MB body" below): a rejection too, which schemathesis' list leaves out.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def test_the_fuzzed_operations_are_all_of_them(api_schema: schemathesis.BaseSchema) -> None:
    found = {(result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def runnable(body: Any, path: str) -> Any:
    """A valid generated body made servable and cheap: the served model, a few tokens and choices, and
    for chat, turns that alternate as the Llama 2 template demands, text parts and no tools. What
    this leaves out (other models, templates refusing turns, every bound) the error tables cover."""
    if not isinstance(body, dict) or path == "/v1/encode":
        return body
    if path == "/v1/chat/interactive":
        return runnable_interactive(body)
    if path == "/v1/messages":
        return {**body, "model": MODEL_NAME, "max_tokens": FUZZ_MAX_TOKENS, "tools": None, "tool_choice": None}
    if path == "/v1/messages/count_tokens":
        return {**body, "model": MODEL_NAME, "tools": None, "tool_choice": None}
    if path == "/v1/responses":
        return {**body, "model": MODEL_NAME, "max_output_tokens": FUZZ_MAX_TOKENS, "tools": None, "tool_choice": None}
    if path == "/v1/embeddings":  # a few inputs of a batch
        inputs = body.get("input")
        several = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        return {**body, "model": MODEL_NAME, "input": inputs[:2] if several else inputs}
    if path == "/generate":  # the model is optional there, and input_ids may be any length
        ids = body.get("input_ids")
        return {**body, "model": None, "max_tokens": FUZZ_MAX_TOKENS, "max_completion_tokens": None, "n": None,
                "input_ids": ids[:8] if isinstance(ids, list) else ids}  # fmt: skip
    body = {**body, "model": MODEL_NAME, "max_tokens": FUZZ_MAX_TOKENS, "max_completion_tokens": None}
    n = body.get("n")
    body["n"] = min(n, 2) if isinstance(n, int) and n > 0 else 1  # also for n spelled as a string
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:2]
    if "messages" in body:
        for name in ("tools", "tool_choice", "logprobs", "top_logprobs"):
            body.pop(name, None)
        body["messages"] = _alternating(body["messages"])
    return body


def runnable_interactive(body: dict[str, Any]) -> dict[str, Any]:
    """/v1/chat/interactive: a few tokens, no adapter or image, and one-off turns (interactive_mode
    false ends the session), so that no session outlives the test."""
    body = {**body, "interactive_mode": False, "request_output_len": FUZZ_MAX_TOKENS, "adapter_name": None,
            "image_url": None}  # fmt: skip
    if isinstance(body["prompt"], list):
        body["prompt"] = _alternating(body["prompt"])
    return body


def _alternating(messages: list[Any]) -> list[dict[str, Any]]:
    turns = messages[1 - len(messages) % 2 :]  # an odd count: user first and last
    return [
        {"role": "assistant" if i % 2 else "user", "content": _text(message.get("content"))}
        for i, message in enumerate(turns)
    ]


def _text(content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": part.get("text", "")} for part in content if isinstance(part, dict)] or ""
    return content


# Valid input for every operation, invalid input where there is input to make invalid (not the GETs).
CASES = [(method, path, mode) for method, path in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if not (mode is GenerationMode.NEGATIVE and method == "GET")]  # fmt: skip


@pytest.mark.parametrize("method, path, mode", CASES,
                         ids=[f"{m} {p} {'valid' if mode is GenerationMode.POSITIVE else 'invalid'}"
                              for m, p, mode in CASES])  # fmt: skip
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    api_schema: schemathesis.BaseSchema, http_server: LiveServer, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE:
            case.body = runnable(case.body, path)
        # A valid body may still be refused (an unknown model, a prompt longer than the session):
        # limits the schema cannot express. Every other check applies.
        case.call_and_validate(base_url=http_server.base_url, excluded_checks=[positive_data_acceptance])

    fuzz()
    assert http_server.engine.wait_idle(30) and http_server.engine.alive


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"Content-Type": "application/json"}
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": USER, "max_tokens": 2, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **fields}).encode()


def nested(depth: int) -> bytes:
    return b'{"model": "tiny-llama", "messages": ' + b"[" * depth + b"]" * depth + b"}"


# (name, method, path, body, headers, status, param or None, code or None). Complements the malformed
# requests of test_http_errors.py with ones meant to exhaust, overflow, smuggle or probe.
HOSTILE: list[tuple[str, str, str, bytes | None, dict[str, str], int, str | None, str | None]] = [
    # sizes meant to exhaust memory or CPU
    ("n 10**6", "POST", CHAT, chat(n=10**6), JSON, 400, "n", None),
    ("n 2**64", "POST", COMPLETIONS, completion(n=2**64), JSON, 400, "n", None),
    ("10,000 prompts", "POST", COMPLETIONS, completion(prompt=["a"] * 10_000), JSON, 400, "prompt", None),
    ("10,000 token-id prompts", "POST", COMPLETIONS, completion(prompt=[[1]] * 10_000), JSON, 400, "prompt", None),
    ("prompts × n over 128", "POST", COMPLETIONS, completion(prompt=["a"] * 65, n=2), JSON, 400, "n", None),
    ("10,000 stop strings", "POST", COMPLETIONS, completion(stop=["a"] * 10_000), JSON, 400, "stop", None),
    ("100,000-character stop string", "POST", COMPLETIONS, completion(stop="a" * 100_000), JSON, 400, "stop", None),
    ("100,000 messages", "POST", CHAT, chat(messages=USER * 100_000), JSON, 400, "messages", None),
    ("10,000 content parts", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text",
     "text": "word " * 10}] * 10_000}]), JSON, 400, "messages", "context_length_exceeded"),
    ("a megabyte of prompt", "POST", COMPLETIONS, completion(prompt="word " * 200_000), JSON, 400, "prompt",
     "context_length_exceeded"),
    ("million-element array body", "POST", COMPLETIONS, b"[" + b"0," * 1_000_000 + b"0]", JSON, 400, None,
     "invalid_json"),
    ("5 MB body", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * 5_000_000}]), JSON, 413, None,
     "request_too_large"),
    # nesting and numbers meant to blow a parser's stack or an integer
    ("100,000-deep arrays", "POST", CHAT, nested(100_000), JSON, 400, None, "invalid_json"),
    ("10,000-deep objects", "POST", CHAT, b'{"model": "tiny-llama", "chat_template_kwargs": ' + b'{"a": ' * 10_000
     + b"1" + b"}" * 10_000 + b', "messages": [{"role": "user", "content": "x"}]}', JSON, 400, None,
     "invalid_json"),
    ("10,000-digit seed", "POST", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "x", "seed": ' + b"9" * 10_000
     + b"}", JSON, 400, None, "invalid_json"),
    ("temperature 1e400", "POST", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "x", "temperature": 1e400}',
     JSON, 400, "temperature", None),
    ("top_p -Infinity", "POST", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "x", "top_p": -Infinity}', JSON,
     400, "top_p", None),
    ("max_tokens -2**63", "POST", COMPLETIONS, completion(max_tokens=-(2**63)), JSON, 400, "max_tokens", None),
    ("top_k 2**40 (past int32)", "POST", COMPLETIONS, completion(top_k=2**40), JSON, 400, "top_k", None),
    ("top_k 2**70", "POST", COMPLETIONS, completion(top_k=2**70), JSON, 400, "top_k", None),
    ("min_new_tokens 2**70", "POST", COMPLETIONS, completion(min_new_tokens=2**70), JSON, 400, "min_new_tokens",
     None),
    ("seed 2**63", "POST", COMPLETIONS, completion(seed=2**63), JSON, 400, "seed", None),
    ("token id 2**70", "POST", COMPLETIONS, completion(prompt=[1, 2**70]), JSON, 400, "prompt", None),
    ("negative token id", "POST", COMPLETIONS, completion(prompt=[1, -5]), JSON, 400, "prompt[1]", None),
    ("stop token id 2**40", "POST", COMPLETIONS, completion(stop_token_ids=[2**40]), JSON, 400, "stop_token_ids",
     None),
    ("negative stop token id", "POST", COMPLETIONS, completion(stop_token_ids=[-1]), JSON, 400, "stop_token_ids",
     None),
    # encodings and smuggling
    ("lone surrogate in content", "POST", CHAT,
     b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud800"}]}', JSON, 400, None,
     "invalid_json"),
    ("lone surrogate in prompt", "POST", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "\\udfff x"}', JSON, 400,
     None, "invalid_json"),
    ("byte-order mark", "POST", COMPLETIONS, b"\xef\xbb\xbf" + completion(), JSON, 400, None, "invalid_json"),
    ("UTF-16 body", "POST", COMPLETIONS, completion().decode().encode("utf-16"),
     {"Content-Type": "application/json; charset=utf-16"}, 400, None, "invalid_json"),
    ("gzip body (no decompression bombs)", "POST", COMPLETIONS, gzip.compress(completion()),
     {**JSON, "Content-Encoding": "gzip"}, 400, None, "invalid_json"),
    ("multipart body", "POST", CHAT, b"--x\r\n\r\n--x--", {"Content-Type": "multipart/form-data; boundary=x"},
     400, None, "invalid_content_type"),
    # probing models, paths and methods
    ("path traversal as model", "POST", COMPLETIONS, completion(model="../../etc/passwd"), JSON, 404, "model",
     "model_not_found"),
    ("100,000-character model", "POST", COMPLETIONS, completion(model="m" * 100_000), JSON, 404, "model",
     "model_not_found"),
    ("model as an object", "POST", CHAT, chat(model={"$ne": None}), JSON, 400, "model", None),
    ("path traversal in the URL", "GET", "/v1/../../etc/passwd", None, {}, 404, None, "not_found"),
    ("static file traversal", "GET", "/static/../../etc/passwd", None, {}, 404, None, "not_found"),
    ("no static files", "GET", "/static/app.js", None, {}, 404, None, "not_found"),
    ("admin route guess", "POST", "/v1/load_lora_adapter", b'{"lora_path": "/etc"}', JSON, 404, None, "not_found"),
    ("PUT on completions", "PUT", COMPLETIONS, completion(), JSON, 405, None, "method_not_allowed"),
    ("DELETE on models", "DELETE", "/v1/models", None, {}, 405, None, "method_not_allowed"),
    ("TRACE on health", "TRACE", "/health", None, {}, 405, None, "method_not_allowed"),
    # features that would reach out or leak
    ("image URL to cloud metadata", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url",
     "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}]), JSON, 400,
     "messages[0].content[0].type", None),
    ("audio input", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "input_audio",
     "input_audio": {"data": "AAAA", "format": "wav"}}]}]), JSON, 400, "messages[0].content[0].type", None),
    ("top_logprobs 10,000", "POST", CHAT, chat(logprobs=True, top_logprobs=10_000), JSON, 400, "top_logprobs", None),
    ("completion logprobs 10,000", "POST", COMPLETIONS, completion(logprobs=10_000), JSON, 400, "logprobs", None),
    ("echo with logprobs 6", "POST", COMPLETIONS, completion(echo=True, logprobs=6), JSON, 400, "logprobs", None),
    ("tool call without a function", "POST", CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{"x": 1}]},
     *USER]), JSON, 400, "messages[0].tool_calls[0].function", None),
    ("user as an object", "POST", COMPLETIONS, completion(user={"$where": "1"}), JSON, 400, "user", None),
]



@pytest.mark.parametrize(
    "name, method, path, body, headers, status, param, code", HOSTILE, ids=[case[0] for case in HOSTILE]
)
def test_hostile_request_gets_a_4xx_in_openai_format(
    http_server: LiveServer,
    name: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    began = time.monotonic()
    response = http.request(method, http_server.base_url + path, content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert len(error["message"]) < 2000  # nothing huge is echoed back
    assert (error["param"], error["code"]) == (param, code)
    assert time.monotonic() - began < 5  # refused before any expensive work


HUGE_MAX_TOKENS = [
    (COMPLETIONS, completion(max_tokens=10**9)),
    (COMPLETIONS, completion(max_tokens=2**64)),
    (CHAT, chat(max_completion_tokens=2**63)),
    (COMPLETIONS, b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 1, "max_tokens": 1000000000}'),
]


@pytest.mark.parametrize("path, body", HUGE_MAX_TOKENS, ids=["10**9", "2**64", "2**63 chat", "duplicate key"])
def test_a_huge_max_tokens_costs_at_most_the_session(http_server: LiveServer, path: str, body: bytes) -> None:
    """Past the room the prompt leaves, max_tokens is capped there (LMDeploy's contract; --strict-context-length
    refuses it instead): never more than the session length of work."""
    response = http.post(http_server.base_url + path, content=body, headers=JSON, timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["usage"]["total_tokens"] <= http_server.engine.max_session_len


def test_template_and_injection_shaped_text_is_only_text(http_server: LiveServer) -> None:
    """Jinja, format strings and NUL bytes in what a client sends are data, never evaluated."""
    client = http_server.client()
    for content in ("{{ 7*7 }} {% for i in range(10**9) %}{{ i }}{% endfor %}", "%s%n{0.__class__}", "a\u0000b"):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}],
                                               max_tokens=2, extra_body={"chat_template_kwargs": {"x": content}})
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert http_server.engine.alive and http_server.engine.wait_idle(30)
