"""What LMDeploy's own api_server tests (its `autotest/interface/restful/`) check, against the shared live
server: `/v1/encode` and `APIClient.encode`, `/generate` (text or token ids, streamed or not, its
refusals), the role in every chat delta, each stream's finish_reason in a last chunk of empty text,
string-spelled booleans and numbers, `max_tokens` past the session running to it with `length`, and
`APIClient` yielding error answers as the dicts the server sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serving.client import APIClient, APIClientError, get_model_list
from tests.http_fixtures import LiveServer, http, shared_http_server  # noqa: F401 (`http_server`)
from tests.test_http_api import sse_events

USER = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def api_client(http_server: LiveServer) -> Iterator[APIClient]:
    with APIClient(http_server.base_url) as client:
        yield client


def post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(server.base_url + path, json=body, timeout=120)


def stream(server: LiveServer, path: str, body: dict[str, Any]) -> list[dict | str]:
    with http.stream("POST", server.base_url + path, json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


# ---- /v1/encode ----------------------------------------------------------------------------------


def test_encode_counts_as_the_tokenizer_and_the_chat_route_do(http_server: LiveServer, api_client: APIClient) -> None:
    tokenizer = http_server.engine.tokenizer
    text = "Hi, please introduce yourself"
    ids, length = api_client.encode(text)
    assert ids == tokenizer.encode(text) and length == len(ids) > 0
    bare, bare_length = api_client.encode(text, add_bos=False)
    assert bare == tokenizer.encode(text, add_special_tokens=False) and bare_length == len(bare)
    assert ids == [tokenizer.bos_token_id, *bare]  # the tiny tokenizer adds a BOS
    # do_preprocess: the prompt /v1/chat/completions would run, so the count is the one usage reports
    templated, templated_length = api_client.encode(text, do_preprocess=True)
    chat = post(http_server, "/v1/chat/completions", {"model": http_server.model_name, "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": text}]})  # fmt: skip
    assert templated_length == len(templated) == chat.json()["usage"]["prompt_tokens"] > length
    answer = post(http_server, "/v1/encode", {"input": [text, "two"], "add_bos": "false"}).json()
    assert answer == {"input_ids": [bare, tokenizer.encode("two", add_special_tokens=False)],
                      "length": [len(bare), len(tokenizer.encode("two", add_special_tokens=False))]}  # fmt: skip


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": 5}, {"input": [1, 2]},
                                  {"input": "x", "add_bos": "maybe"}])
def test_encode_refuses_malformed_input(http_server: LiveServer, body: dict[str, Any]) -> None:
    response = post(http_server, "/v1/encode", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


# ---- /generate -----------------------------------------------------------------------------------


def test_generate_answers_text_ids_and_meta_info(http_server: LiveServer) -> None:
    tokenizer = http_server.engine.tokenizer
    prompt = "The sky is"
    answer = post(http_server, "/generate", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True}).json()  # fmt: skip
    assert set(answer) == {"text", "output_ids", "meta_info"}
    assert len(answer["output_ids"]) == 5 and all(isinstance(i, int) for i in answer["output_ids"])
    assert answer["text"] == tokenizer.decode(answer["output_ids"])
    meta = answer["meta_info"]
    assert meta["prompt_tokens"] == len(tokenizer.encode(prompt)) and meta["completion_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length"} and meta["cached_tokens"] >= 0
    # The same prompt as token ids, with the model named (optional): the same greedy answer.
    by_ids = post(http_server, "/generate", {"input_ids": tokenizer.encode(prompt), "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True, "model": http_server.model_name}).json()  # fmt: skip
    assert (by_ids["text"], by_ids["output_ids"]) == (answer["text"], answer["output_ids"])
    # Streamed: the pieces add up to the same answer; each event holds only what is new, the last (empty
    # text) the finish reason; then [DONE].
    events = stream(http_server, "/generate", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                               "ignore_eos": True, "stream": "true"})  # fmt: skip
    assert events[-1] == "[DONE]"
    pieces, last = events[:-2], events[-2]
    assert 1 <= len(pieces) <= 5 and all(p["meta_info"]["finish_reason"] is None for p in pieces)
    assert "".join(p["text"] for p in pieces) == answer["text"]
    assert [i for p in pieces for i in p["output_ids"]] == answer["output_ids"]
    assert (last["text"], last["output_ids"]) == ("", [])
    assert last["meta_info"]["finish_reason"] == {"type": "length"} and last["meta_info"]["completion_tokens"] == 5


def test_generate_defaults_to_128_tokens_capped_by_the_session(http_server: LiveServer) -> None:
    answer = post(http_server, "/generate", {"prompt": "Once upon a time", "ignore_eos": True}).json()
    meta = answer["meta_info"]
    assert meta["finish_reason"] == {"type": "length"}
    assert meta["prompt_tokens"] + meta["completion_tokens"] == http_server.engine.max_session_len  # 128 would not fit


def test_generate_stop_string_with_and_without_it_in_the_text(http_server: LiveServer) -> None:
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = post(http_server, "/generate", body).json()["text"]
    stop = whole[len(whole) // 2 :][:2]
    assert stop.strip(), f"no stop string to take from {whole!r}"
    cut = whole.index(stop)
    excluded = post(http_server, "/generate", {**body, "stop": [stop]}).json()
    included = post(http_server, "/generate", {**body, "stop": [stop], "include_stop_str_in_output": True}).json()
    assert excluded["text"] == whole[:cut] and included["text"] == whole[: cut + len(stop)]
    assert excluded["meta_info"]["finish_reason"] == {"type": "stop"}


REFUSED_GENERATE = [
    ({"prompt": "Hello", "input_ids": [1, 2, 3]}, "prompt", "exactly one of prompt and input_ids"),
    ({"prompt": "Test", "input_ids": []}, "prompt", "exactly one of prompt and input_ids"),
    ({"max_tokens": 5}, "prompt", "exactly one of prompt and input_ids"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"input_ids": []}, "input_ids", "must not be empty"),
    ({"input_ids": "not_a_list"}, "input_ids", None),
    ({"input_ids": [1, -2]}, "input_ids[1]", None),
    ({"prompt": "x", "return_logprob": True}, "return_logprob", "not supported"),
    ({"prompt": "x", "image_data": "data:image/png;base64,AAAA"}, "image_data", "text only"),
    ({"prompt": "x", "n": 2}, "n", "/v1/completions"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", None),
    ({"input_ids": [5] * 200}, "input_ids", "maximum context length"),
]


@pytest.mark.parametrize("body, param, words", REFUSED_GENERATE, ids=[json.dumps(c[0])[:40] for c in REFUSED_GENERATE])
def test_generate_refusals(http_server: LiveServer, body: dict[str, Any], param: str, words: str | None) -> None:
    response = post(http_server, "/generate", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and (words is None or words in error["message"]), error


def test_generate_unknown_model_is_404(http_server: LiveServer) -> None:
    response = post(http_server, "/generate", {"prompt": "x", "model": "no-such-model"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


# ---- the OpenAI routes as LMDeploy's clients read them --------------------------------------------


def test_every_stream_ends_each_choice_with_an_empty_chunk(http_server: LiveServer) -> None:
    """LMDeploy's checks: every chat delta has the role and content; every chunk before a choice's last has
    finish_reason null; the last has empty text and the finish reason (chat and completions alike)."""
    common = {"model": http_server.model_name, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
    chat = stream(http_server, "/v1/chat/completions", {**common, "messages": USER})[:-1]
    assert all(c["choices"][0]["delta"]["role"] == "assistant" and "content" in c["choices"][0]["delta"] for c in chat)
    assert [c["choices"][0]["finish_reason"] for c in chat] == [None] * (len(chat) - 1) + ["length"]
    assert chat[-1]["choices"][0]["delta"]["content"] == ""
    text = stream(http_server, "/v1/completions", {**common, "prompt": "Once"})[:-1]
    assert [c["choices"][0]["finish_reason"] for c in text] == [None] * (len(text) - 1) + ["length"]
    assert text[-1]["choices"][0]["text"] == "" and all(c["choices"][0]["text"] for c in text[:-1])


def test_strings_that_spell_booleans_and_numbers_are_read_as_them(http_server: LiveServer) -> None:
    body = {"model": http_server.model_name, "messages": USER, "stream": "true", "max_tokens": "3", "temperature": "0",
            "ignore_eos": "True", "top_p": " 0.9 ", "stream_options": {"include_usage": "true"}}  # fmt: skip
    events = stream(http_server, "/v1/chat/completions", body)
    assert events[-2]["usage"]["completion_tokens"] == 3
    turn = post(http_server, "/v1/chat/interactive", {"prompt": "hi", "session_id": "-1", "request_output_len": "2",
                                                      "ignore_eos": "true", "interactive_mode": "false"})  # fmt: skip
    assert turn.json()["tokens"] == 2
    for field, value in (("stream", "yes"), ("max_tokens", 2.5), ("max_tokens", "3.0"), ("temperature", True),
                         ("temperature", "warm"), ("n", "1e3"), ("seed", "0x10")):  # fmt: skip
        response = post(http_server, "/v1/completions", {"model": http_server.model_name, "prompt": "x",
                                                         field: value})  # fmt: skip
        assert response.status_code == 400 and response.json()["error"]["param"] == field, (field, value)


def test_max_tokens_past_the_session_runs_to_it_and_finishes_with_length(http_server: LiveServer) -> None:
    session_len = http_server.engine.max_session_len
    for path, prompt in (("/v1/completions", {"prompt": "word " * 20}), ("/v1/chat/completions", {"messages": USER})):
        body = {"model": http_server.model_name, "max_tokens": 10**9, "ignore_eos": True, **prompt}
        answer = post(http_server, path, body).json()
        assert answer["choices"][0]["finish_reason"] == "length", answer
        assert answer["usage"]["total_tokens"] == session_len
    # A prompt that fills the session alone is still refused.
    refused = post(http_server, "/v1/completions", {"model": http_server.model_name, "prompt": [5] * session_len,
                                                    "max_tokens": 10})  # fmt: skip
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


# ---- APIClient -----------------------------------------------------------------------------------


def test_api_client_yields_error_answers_unless_asked_to_raise(http_server: LiveServer, api_client: APIClient) -> None:
    for stream_it in (False, True):
        [error] = api_client.chat_completions_v1("no-such-model", USER, stream=stream_it)
        assert error["error"]["code"] == "model_not_found" and "no-such-model" in error["error"]["message"]
    [error] = api_client.completions_v1(http_server.model_name, "hi", max_tokens=-1)
    assert error["error"]["param"] == "max_tokens"
    [(text, tokens, reason)] = api_client.chat(USER[0]["content"], session_id=-1, request_output_len=-1)
    assert (tokens, reason) == (0, "error") and "request_output_len" in text
    with APIClient(http_server.base_url, raise_errors=True) as raising:
        with pytest.raises(APIClientError) as raised:
            list(raising.chat_completions_v1("no-such-model", USER))
        assert raised.value.status == 404 and raised.value.code == "model_not_found"
        with pytest.raises(APIClientError):
            raising.encode([])
    assert api_client.encode([]) == (None, None)
    models = get_model_list(f"{http_server.base_url}/v1/models")
    assert models == api_client.available_models == [http_server.model_name]
    assert get_model_list(f"{http_server.base_url}/v1/no-such-list") is None
